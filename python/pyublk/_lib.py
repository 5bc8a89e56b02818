"""Loading libublk.so and its ctypes declarations (they mirror include/ublk.h;
tests/test_host.py fails when the two drift apart)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import (CFUNCTYPE, POINTER, Structure, c_char, c_char_p, c_int, c_int32, c_size_t,
                    c_uint8, c_uint16, c_uint32, c_uint64, c_void_p)
from pathlib import Path

# --- constants (include/ublk.h) ------------------------------------------------------
UBLK_OP_READ = 0
UBLK_OP_WRITE = 1
UBLK_OP_FLUSH = 2
UBLK_OP_DISCARD = 3
UBLK_OP_WRITE_ZEROES = 5
UBLK_FLAG_FUA = 8192
UBLK_FLAG_NOUNMAP = 32768
UBLK_DATA_AUTO = 0
UBLK_DATA_AUTO_BUF_REG = 1
UBLK_DATA_REGISTER = 2
UBLK_DATA_USER_COPY = 3
UBLK_DATA_COPY = 4
UBLK_BATCH_PENDING = -(1 << 31)
UBLK_RECOVERY_NONE = 0
UBLK_RECOVERY_REISSUE = 1
UBLK_RECOVERY_FAIL = 2
UBLK_RECOVERY_WAIT = 3
UBLK_AFFINITY_SINGLE = 0
UBLK_AFFINITY_ALL = 1
UBLK_MAP_READ = 1
UBLK_MAP_WRITE = 2

CONSTANTS = {k: v for k, v in dict(globals()).items() if k.startswith("UBLK_")}


# --- structs -------------------------------------------------------------------------
class ublk_dev_config(Structure):
    _fields_ = [
        ("size", c_uint64),
        ("logical_block_size", c_uint32),
        ("physical_block_size", c_uint32),
        ("max_io_bytes", c_uint32),
        ("nr_queues", c_uint16),
        ("queue_depth", c_uint16),
        ("dev_id", c_int32),
        ("read_only", c_uint8),
        ("rotational", c_uint8),
        ("volatile_cache", c_uint8),
        ("discard", c_uint8),
        ("discard_granularity", c_uint32),
        ("max_discard_sectors", c_uint32),
        ("max_write_zeroes_sectors", c_uint32),
        ("timeout_ms", c_uint32),
        ("flags", c_uint64),
        ("data_mode", c_uint32),
        ("needs_buffer", c_uint8),
        ("target_name", c_char_p),
        ("state_dir", c_char_p),
        ("recovery", c_uint32),
        ("cpu_affinity", c_uint32),
        ("target_args", c_char_p),
        ("reserved", c_uint64 * 6),
    ]


class ublk_nbd_config(Structure):
    _fields_ = [
        ("host", c_char_p),
        ("export_name", c_char_p),
        ("port", c_uint16),
        ("connections", c_uint16),
        ("timeout_ms", c_uint32),
        ("reserved", c_uint64 * 4),
    ]


HANDLE_IO = CFUNCTYPE(None, c_void_p, c_void_p)
QUEUE_INIT = CFUNCTYPE(c_int, c_void_p, c_uint16, POINTER(c_void_p))
QUEUE_DEINIT = CFUNCTYPE(None, c_void_p, c_uint16, c_void_p)
BACKING_CB = CFUNCTYPE(None, c_void_p, c_void_p, c_int)


class ublk_io_desc(Structure):
    _fields_ = [
        ("op", c_int32),
        ("flags", c_uint32),
        ("offset", c_uint64),
        ("len", c_uint32),
        ("queue_id", c_uint16),
        ("tag", c_uint16),
    ]


class ublk_io_batch_entry(Structure):
    _fields_ = [
        ("io", c_void_p),
        ("buf", c_void_p),
        ("desc", ublk_io_desc),
        ("result", c_int32),
        ("lease_fd", c_int32),
        ("lease_file_off", c_uint64),
    ]


HANDLE_BATCH = CFUNCTYPE(None, c_void_p, c_void_p, c_uint32)


class ublk_target_ops(Structure):
    _fields_ = [("handle_io", HANDLE_IO), ("queue_init", QUEUE_INIT), ("queue_deinit", QUEUE_DEINIT),
                ("handle_batch", HANDLE_BATCH)]


class ublk_dev_info(Structure):
    _fields_ = [
        ("dev_id", c_uint32),
        ("nr_queues", c_uint16),
        ("queue_depth", c_uint16),
        ("max_io_bytes", c_uint32),
        ("data_mode", c_uint32),
        ("flags", c_uint64),
        ("size", c_uint64),
        ("recovery", c_uint32),
    ]


class ublk_queue_stats(Structure):
    _fields_ = [
        ("ios", c_uint64),
        ("bytes", c_uint64),
        ("errors", c_uint64),
        ("in_flight", c_uint64),
        ("copied_bytes", c_uint64),
        ("lease_ops", c_uint64),
    ]


STRUCTS = {
    "ublk_io_desc": ublk_io_desc,
    "ublk_io_batch_entry": ublk_io_batch_entry,
    "ublk_dev_config": ublk_dev_config,
    "ublk_target_ops": ublk_target_ops,
    "ublk_dev_info": ublk_dev_info,
    "ublk_queue_stats": ublk_queue_stats,
    "ublk_nbd_config": ublk_nbd_config,
}

# --- functions: name -> (restype, argtypes) ------------------------------------------
_io = c_void_p
_dev = c_void_p
FUNCTIONS = {
    "ublk_data_mode_name": (c_char_p, [c_uint32]),
    "ublk_strerror": (c_char_p, [c_int]),
    "ublk_last_error_message": (c_int, [POINTER(c_char), c_size_t]),
    "ublk_features": (c_int, [POINTER(c_uint64)]),
    "ublk_feature_name": (c_char_p, [c_uint32]),
    "ublk_dev_config_init": (c_int, [POINTER(ublk_dev_config)]),
    "ublk_dev_new": (c_int, [POINTER(ublk_dev_config), POINTER(ublk_target_ops), c_void_p, POINTER(c_void_p)]),
    "ublk_nbd_config_init": (c_int, [POINTER(ublk_nbd_config)]),
    "ublk_nbd_dev_new": (c_int, [POINTER(ublk_dev_config), POINTER(ublk_nbd_config), POINTER(c_void_p)]),
    "ublk_dev_recover": (c_int, [c_uint32, c_char_p, POINTER(ublk_target_ops), c_void_p, POINTER(c_void_p)]),
    "ublk_dev_target_name": (c_char_p, [_dev]),
    "ublk_dev_target_args": (c_char_p, [_dev]),
    "ublk_dev_start": (c_int, [_dev]),
    "ublk_dev_serve": (c_int, [_dev]),
    "ublk_dev_wait": (c_int, [_dev, c_int]),
    "ublk_dev_stop": (c_int, [_dev]),
    "ublk_dev_map": (c_int, [_dev, c_uint64, c_uint64, c_int, c_uint64, c_uint32]),
    "ublk_dev_unmap": (c_int, [_dev, c_uint64, c_uint64]),
    "ublk_dev_free": (None, [_dev]),
    "ublk_dev_id": (c_int, [_dev]),
    "ublk_dev_path": (c_char_p, [_dev]),
    "ublk_dev_get_info": (c_int, [_dev, POINTER(ublk_dev_info)]),
    "ublk_dev_queue_stats": (c_int, [_dev, c_uint16, POINTER(ublk_queue_stats)]),
    "ublk_io_complete": (c_int, [_io, c_int]),
    "ublk_io_complete_batch": (c_int, [POINTER(_io), POINTER(c_int), c_size_t, POINTER(c_int)]),
    "ublk_io_op": (c_int, [_io]),
    "ublk_io_get_desc": (c_int, [_io, POINTER(ublk_io_desc)]),
    "ublk_io_flags": (c_uint32, [_io]),
    "ublk_io_offset": (c_uint64, [_io]),
    "ublk_io_len": (c_uint32, [_io]),
    "ublk_io_queue_id": (c_uint16, [_io]),
    "ublk_io_tag": (c_uint16, [_io]),
    "ublk_io_buf": (c_void_p, [_io]),
    "ublk_io_queue_data": (c_void_p, [_io]),
    "ublk_io_lease_read": (c_int, [_io, c_int, c_uint64, c_uint32, c_uint32, BACKING_CB, c_void_p]),
    "ublk_io_lease_write": (c_int, [_io, c_int, c_uint64, c_uint32, c_uint32, BACKING_CB, c_void_p]),
    "ublk_io_lease_send": (c_int, [_io, c_int, c_uint32, c_uint32, BACKING_CB, c_void_p]),
    "ublk_io_lease_recv": (c_int, [_io, c_int, c_uint32, c_uint32, BACKING_CB, c_void_p]),
    "ublk_io_lease_manual": (c_int, [_io]),
    "ublk_io_register_fd": (c_int, [_io, c_int]),
    "ublk_io_fsync": (c_int, [_io, c_int, c_int, BACKING_CB, c_void_p]),
    "ublk_io_fallocate": (c_int, [_io, c_int, c_int, c_uint64, c_uint64, BACKING_CB, c_void_p]),
}

LIB_NAMES = ("libublk.so", "libublk.so.0")


def _candidates() -> list[str]:
    """Where libublk.so is looked for, in order."""
    here = Path(__file__).resolve().parent
    out = [str(here / n) for n in LIB_NAMES]
    env = os.environ.get("PYUBLK_LIB")
    if env:
        out.append(env)
    found = ctypes.util.find_library("ublk")
    out += [found] if found else []
    out += list(LIB_NAMES)  # the dynamic loader's own search path
    return out


def load() -> ctypes.CDLL:
    """Loads libublk.so: the copy inside this package (put there by the build),
    else $PYUBLK_LIB, else the system library path. Raises OSError naming
    every place tried."""
    tried = []
    for c in _candidates():
        if os.sep in c and not os.path.exists(c):
            tried.append(f"{c} (missing)")
            continue
        try:
            lib = ctypes.CDLL(c)
        except OSError as e:
            tried.append(f"{c} ({e})")
            continue
        declare(lib)
        return lib
    raise OSError("pyublk: cannot load libublk.so; tried:\n  " + "\n  ".join(tried) +
                  "\nbuild it (make build) and reinstall pyublk, or set PYUBLK_LIB=/path/to/libublk.so")


def declare(lib: ctypes.CDLL) -> None:
    for name, (res, args) in FUNCTIONS.items():
        f = getattr(lib, name)
        f.restype = res
        f.argtypes = args


_LIB: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = load()
    return _LIB
