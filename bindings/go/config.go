package ublk

/*
#include <ublk.h>
*/
import "C"

import (
	"fmt"
	"strings"
	"time"
)

// DataMode is how request data moves between the kernel and the server.
type DataMode uint32

const (
	// DataAuto: the best mode the kernel offers (copy for ReaderAt/WriterAt
	// backends and Config.NeedsBuffer, which read the data with the CPU).
	DataAuto DataMode = C.UBLK_DATA_AUTO
	// DataAutoBufReg: zero copy, the kernel registers each request's buffer (6.16+).
	DataAutoBufReg DataMode = C.UBLK_DATA_AUTO_BUF_REG
	// DataRegister: zero copy, the engine registers a buffer when leased (6.15+).
	DataRegister DataMode = C.UBLK_DATA_REGISTER
	// DataUserCopy: pread/pwrite on /dev/ublkcN through a bounce buffer (6.5+).
	DataUserCopy DataMode = C.UBLK_DATA_USER_COPY
	// DataCopy: the kernel copies into a per-request buffer (Request.Data).
	DataCopy DataMode = C.UBLK_DATA_COPY
)

var modeNames = []string{"auto", "auto-buf-reg", "register", "user-copy", "copy"}

func (m DataMode) String() string {
	if int(m) < len(modeNames) {
		return modeNames[m]
	}
	return fmt.Sprintf("DataMode(%d)", uint32(m))
}

// ParseDataMode parses "auto", "auto-buf-reg", "register", "user-copy" or "copy".
func ParseDataMode(s string) (DataMode, error) {
	for i, n := range modeNames {
		if s == n {
			return DataMode(i), nil
		}
	}
	return 0, invalid("data mode %q: want one of %s", s, strings.Join(modeNames, ", "))
}

// Recovery is what happens to a device when its server process dies (even
// with kill -9) without removing it (the kernel's UBLK_F_USER_RECOVERY).
type Recovery uint32

const (
	// RecoveryNone: the kernel stops the device; it is gone (default).
	RecoveryNone Recovery = C.UBLK_RECOVERY_NONE
	// RecoveryReissue: the device waits for a new server (Recover); the
	// requests the dead server held are sent again to it, new IO waits.
	RecoveryReissue Recovery = C.UBLK_RECOVERY_REISSUE
	// RecoveryFail: while no server runs, all IO fails with EIO at once
	// (Linux 6.13+); Recover serves the device again.
	RecoveryFail Recovery = C.UBLK_RECOVERY_FAIL
	// RecoveryWait: the requests the dead server held fail, new IO waits for
	// the next server (Recover).
	RecoveryWait Recovery = C.UBLK_RECOVERY_WAIT
)

var recoveryNames = []string{"none", "reissue", "fail", "wait"}

func (r Recovery) String() string {
	if int(r) < len(recoveryNames) {
		return recoveryNames[r]
	}
	return fmt.Sprintf("Recovery(%d)", uint32(r))
}

// ParseRecovery parses "none", "reissue", "fail" or "wait".
func ParseRecovery(s string) (Recovery, error) {
	for i, n := range recoveryNames {
		if s == n {
			return Recovery(i), nil
		}
	}
	return 0, invalid("recovery policy %q: want one of %s", s, strings.Join(recoveryNames, ", "))
}

// Config describes a device. Size is required; zero values take the defaults.
type Config struct {
	Size              int64 // bytes, a multiple of LogicalBlockSize (required)
	Queues            int   // queues, one engine thread each (default 1; the kernel caps it at the CPU count)
	Depth             int   // requests in flight per queue, 1..4096 (default 128)
	LogicalBlockSize  int   // 512..page size (default 512)
	PhysicalBlockSize int   // power of two >= LogicalBlockSize (default 4096)
	MaxIOBytes        int   // largest request, 4096..32 MiB (default 512 KiB)
	ReadOnly          bool  // read-only device (also implied by a backend without WriteAt)
	Rotational        bool

	// ID asks for device id ID (/dev/ublkbID) when FixedID is set; otherwise
	// the kernel picks the first free id.
	ID      int
	FixedID bool

	// DataMode: DataAuto (default) or a specific mode; a mode the kernel
	// lacks fails New with EOPNOTSUPP. ReaderAt/WriterAt backends need copy
	// mode (DataAuto or DataCopy).
	DataMode DataMode
	// NeedsBuffer: a Handler uses Request.Data (copy mode). Implied for
	// ReaderAt/WriterAt backends.
	NeedsBuffer bool
	// Discard: a Handler gets DISCARD and WRITE_ZEROES requests. For other
	// backends it follows from Discard / WriteZeroes methods.
	Discard bool

	// Async: a ReaderAt/WriterAt backend runs in a new goroutine per request,
	// which completes it, instead of inline on the engine's queue thread
	// (the default). Inline is fastest for memory backends; Async lets a
	// slow backend serve many requests of one queue at once. Not used for a
	// Handler (which decides itself): HandleIO always runs on the queue
	// thread, where leases, Fsync and RegisterFd work.
	Async bool

	Name     string        // target name shown by `ublk list` (default "go")
	StateDir string        // directory of the state file (default $UBLK_STATE_DIR, else /run/ublk)
	Timeout  time.Duration // bound on every wait for the kernel (default 30 s)
	Flags    uint64        // extra UBLK_F_* bits (not the data-mode bits)

	// Recovery: what happens if this process dies without closing the
	// device. RecoveryNone (default): the kernel stops it. With another
	// policy the device survives, and a new process takes it over with
	// Recover; the configuration is recorded in the state file in StateDir.
	Recovery Recovery
	// TargetArgs: free text recorded in the state file (e.g.
	// "file=/srv/disk.img") for the process that recovers the device
	// (Device.TargetArgs). Optional.
	TargetArgs string
	// AllCPUs: each queue thread runs on the whole CPU set the kernel maps
	// to its queue. Default (false): on one CPU of that set, where it stays.
	AllCPUs bool

	// OnError gets backend errors (*IOError) and recovered panics
	// (*PanicError) while serving, from any goroutine (often the queue
	// thread); nil logs them with the log package. The failed request has
	// been failed already. It may call Device.Stop or Device.Close (which,
	// on the queue thread, returns at once and finishes in a goroutine).
	OnError func(error)
}

const maxQueues, maxDepth = 4096, 4096

// cConfig checks the values Go can catch (negative, out of the C types'
// range) and fills a C config; the engine checks the rest (ublk_dev_new).
func (cfg *Config) cConfig(c *C.struct_ublk_dev_config) error {
	if cfg.Size <= 0 {
		return invalid("Size %d: must be > 0", cfg.Size)
	}
	return cfg.cConfigSized(c)
}

// cConfigSized is cConfig for a Size that may be 0 (a built-in target that
// takes the size from its backend, as NewNBD).
func (cfg *Config) cConfigSized(c *C.struct_ublk_dev_config) error {
	C.ublk_dev_config_init(c)
	if cfg.Size < 0 {
		return invalid("Size %d: must be >= 0", cfg.Size)
	}
	c.size = C.uint64_t(cfg.Size)
	if cfg.Queues != 0 {
		if cfg.Queues < 1 || cfg.Queues > maxQueues {
			return invalid("Queues %d: must be 1..%d", cfg.Queues, maxQueues)
		}
		c.nr_queues = C.uint16_t(cfg.Queues)
	}
	if cfg.Depth != 0 {
		if cfg.Depth < 1 || cfg.Depth > maxDepth {
			return invalid("Depth %d: must be 1..%d", cfg.Depth, maxDepth)
		}
		c.queue_depth = C.uint16_t(cfg.Depth)
	}
	u32 := func(name string, v int, dst *C.uint32_t) error {
		if v == 0 {
			return nil
		}
		if v < 0 || int64(v) > 1<<32-1 {
			return invalid("%s %d: out of range", name, v)
		}
		*dst = C.uint32_t(v)
		return nil
	}
	if err := u32("LogicalBlockSize", cfg.LogicalBlockSize, &c.logical_block_size); err != nil {
		return err
	}
	if err := u32("PhysicalBlockSize", cfg.PhysicalBlockSize, &c.physical_block_size); err != nil {
		return err
	}
	if cfg.PhysicalBlockSize == 0 && int(c.logical_block_size) > int(c.physical_block_size) {
		c.physical_block_size = c.logical_block_size
	}
	if err := u32("MaxIOBytes", cfg.MaxIOBytes, &c.max_io_bytes); err != nil {
		return err
	}
	if cfg.FixedID {
		if cfg.ID < 0 || cfg.ID > 1<<20 {
			return invalid("ID %d: out of range", cfg.ID)
		}
		c.dev_id = C.int32_t(cfg.ID)
	}
	if int(cfg.DataMode) >= len(modeNames) {
		return invalid("DataMode %d: unknown", uint32(cfg.DataMode))
	}
	c.data_mode = C.uint32_t(cfg.DataMode)
	if int(cfg.Recovery) >= len(recoveryNames) {
		return invalid("Recovery %d: unknown (want RecoveryNone, RecoveryReissue, RecoveryFail or RecoveryWait)", uint32(cfg.Recovery))
	}
	c.recovery = C.uint32_t(cfg.Recovery)
	c.cpu_affinity = C.UBLK_AFFINITY_SINGLE
	if cfg.AllCPUs {
		c.cpu_affinity = C.UBLK_AFFINITY_ALL
	}
	for _, s := range []struct{ name, v string }{{"Name", cfg.Name}, {"StateDir", cfg.StateDir}, {"TargetArgs", cfg.TargetArgs}} {
		if strings.IndexByte(s.v, 0) >= 0 {
			return invalid("%s %q: contains a NUL byte", s.name, s.v)
		}
	}
	if cfg.Timeout < 0 || cfg.Timeout > time.Duration(1<<32-1)*time.Millisecond {
		return invalid("Timeout %v: out of range", cfg.Timeout)
	}
	if cfg.Timeout > 0 {
		c.timeout_ms = C.uint32_t((cfg.Timeout + time.Millisecond - 1) / time.Millisecond)
	}
	c.flags = C.uint64_t(cfg.Flags)
	c.read_only = cbool(cfg.ReadOnly)
	c.rotational = cbool(cfg.Rotational)
	c.needs_buffer = cbool(cfg.NeedsBuffer)
	c.discard = cbool(cfg.Discard)
	return nil
}

func cbool(b bool) C.uint8_t {
	if b {
		return 1
	}
	return 0
}
