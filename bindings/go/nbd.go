package ublk

/*
#include <stdlib.h>
#include "bridge.h"
*/
import "C"

import (
	"context"
	"strings"
	"time"
	"unsafe"
)

// NBDConfig says where an NBD export is, for NewNBD.
type NBDConfig struct {
	Host        string        // server host name or address (required)
	Port        int           // TCP port (default 10809)
	Export      string        // export name ("" : the server's default export)
	Connections int           // TCP connections per queue, 1..16 (default 1; several need a server that allows them)
	Timeout     time.Duration // a request not answered this long fails with EIO (default 30 s, at least 1 s)
}

// NewNBD creates a device served by libublk's built-in NBD client and starts
// it; it returns once Path exists. The engine moves the data between the
// block layer and the sockets itself: there is no Go backend, and Map is
// refused (EOPNOTSUPP). The device's size, read-only flag, flush and discard
// come from the export: cfg.Size must be 0; of cfg, Queues, Depth, DataMode,
// ID, Recovery, AllCPUs, StateDir, Timeout and OnError apply (cfg.Name and
// cfg.TargetArgs are replaced by "nbd" and the export's address). Dropped
// connections are reconnected with backoff. Errors: ECONNREFUSED & co
// (server unreachable), ENXIO (unknown host), ENOENT (no such export),
// EOPNOTSUPP, EPROTO (not NBD), ETIMEDOUT, EINVAL. Close the device when done.
func NewNBD(cfg Config, nbd NBDConfig) (*Device, error) {
	if cfg.Size != 0 {
		return nil, invalid("Size %d: must be 0 for an NBD device (the export's size is used)", cfg.Size)
	}
	var c C.struct_ublk_dev_config
	if err := cfg.cConfigSized(&c); err != nil {
		return nil, err
	}
	var n C.struct_ublk_nbd_config
	C.ublk_nbd_config_init(&n)
	if nbd.Host == "" {
		return nil, invalid("NBDConfig.Host is required")
	}
	if nbd.Port < 0 || nbd.Port > 65535 {
		return nil, invalid("NBDConfig.Port %d: must be 1..65535", nbd.Port)
	}
	if nbd.Port != 0 {
		n.port = C.uint16_t(nbd.Port)
	}
	if nbd.Connections < 0 || nbd.Connections > 16 {
		return nil, invalid("NBDConfig.Connections %d: must be 1..16", nbd.Connections)
	}
	if nbd.Connections != 0 {
		n.connections = C.uint16_t(nbd.Connections)
	}
	if nbd.Timeout < 0 || nbd.Timeout > time.Duration(1<<32-1)*time.Millisecond {
		return nil, invalid("NBDConfig.Timeout %v: out of range", nbd.Timeout)
	}
	if nbd.Timeout != 0 {
		n.timeout_ms = C.uint32_t(nbd.Timeout / time.Millisecond)
	}
	for _, s := range []struct{ name, v string }{{"Host", nbd.Host}, {"Export", nbd.Export}} {
		if strings.IndexByte(s.v, 0) >= 0 {
			return nil, invalid("NBDConfig.%s %q: contains a NUL byte", s.name, s.v)
		}
	}
	n.host = C.CString(nbd.Host)
	defer C.free(unsafe.Pointer(n.host))
	n.export_name = optCString(nbd.Export)
	defer C.free(unsafe.Pointer(n.export_name))
	c.state_dir = optCString(cfg.StateDir)
	defer C.free(unsafe.Pointer(c.state_dir))
	d := newDevice(false, cfg.OnError)
	err := d.open("nbd", false, nil, func(_ C.uintptr_t, out **C.ublk_dev) C.int {
		return C.ublk_nbd_dev_new(&c, &n, out)
	})
	if err != nil {
		return nil, err
	}
	return d, nil
}

// NewNBDContext is NewNBD, and cancelling ctx stops the device and removes
// it (as Close; an error of that Close goes to Config.OnError).
func NewNBDContext(ctx context.Context, cfg Config, nbd NBDConfig) (*Device, error) {
	d, err := NewNBD(cfg, nbd)
	if err != nil {
		return nil, err
	}
	d.closeWhenDone(ctx)
	return d, nil
}
