/* The smallest ublk server: every request succeeds at once. */
#include "common.h"

static void handle_io(void *user, ublk_io *io)
{
    int op = ublk_io_op(io);
    (void)user;
    ublk_io_complete(io, op == UBLK_OP_READ || op == UBLK_OP_WRITE ? (int)ublk_io_len(io) : 0);
}

int main(int argc, char **argv)
{
    struct example_opts o;
    struct ublk_dev_config cfg;
    struct ublk_target_ops ops = { .handle_io = handle_io };

    example_parse(argc, argv, &o);
    example_config(&cfg, &o, o.size, "c-null");
    return example_run("null", &cfg, &ops, NULL, NULL);
}
