/* A device served by libublk's built-in NBD client, through the C API:
 *     c-nbd [-q queues] [-d depth] [-z mode] HOST PORT [EXPORT]
 * Size and flags come from the export; prints "<id> <path>", serves until
 * SIGTERM / `ublk del`, then prints its mode and counters. */
#include "common.h"

int main(int argc, char **argv)
{
    struct example_opts o;
    struct ublk_dev_config cfg;
    struct ublk_nbd_config nbd;
    ublk_dev *dev = NULL;

    example_parse(argc, argv, &o);
    if (argc - optind < 2 || argc - optind > 3) {
        fprintf(stderr, "usage: %s [-q queues] [-d depth] [-z mode] HOST PORT [EXPORT]\n", argv[0]);
        return 2;
    }
    example_config(&cfg, &o, 0, NULL);
    ublk_nbd_config_init(&nbd);
    nbd.host = argv[optind];
    nbd.port = (uint16_t)atoi(argv[optind + 1]);
    if (argc - optind == 3)
        nbd.export_name = argv[optind + 2];
    int r = ublk_nbd_dev_new(&cfg, &nbd, &dev);
    /* The built-in target moves its own data: it has no route table. */
    if (r == 0) {
        int m = ublk_dev_map(dev, 0, 4096, 0, 0, UBLK_MAP_READ);
        if (m != -EOPNOTSUPP) {
            fprintf(stderr, "c-nbd: ublk_dev_map on an nbd device returned %d, want -EOPNOTSUPP\n", m);
            ublk_dev_free(dev);
            return 1;
        }
    }
    return example_serve("c-nbd", dev, r, NULL, NULL);
}
