//! Kernel UAPI of `ublk_drv` (`include/uapi/linux/ublk_cmd.h`), written here as
//! `#[repr(C)]` Rust definitions. Nothing but definitions and layout tests.
//!
//! Layouts follow the 7.1 header; every struct has a size/offset test below.
#![allow(non_camel_case_types)]

/// `_IOC` encoding used by the `UBLK_U_*` (ioctl-encoded) command codes.
const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
const IOC_READ: u32 = 2;
const IOC_RW: u32 = 3;
const CTRL_CMD_SIZE: u32 = 32;
const IO_CMD_SIZE: u32 = 16;

// Control commands (ioctl-encoded, `UBLK_U_CMD_*`).
pub const UBLK_U_CMD_GET_QUEUE_AFFINITY: u32 = ioc(IOC_READ, 0x01, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ioc(IOC_READ, 0x02, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_ADD_DEV: u32 = ioc(IOC_RW, 0x04, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_DEL_DEV: u32 = ioc(IOC_RW, 0x05, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_START_DEV: u32 = ioc(IOC_RW, 0x06, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_STOP_DEV: u32 = ioc(IOC_RW, 0x07, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_SET_PARAMS: u32 = ioc(IOC_RW, 0x08, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_GET_PARAMS: u32 = ioc(IOC_READ, 0x09, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 = ioc(IOC_RW, 0x10, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 = ioc(IOC_RW, 0x11, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_GET_DEV_INFO2: u32 = ioc(IOC_READ, 0x12, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_GET_FEATURES: u32 = ioc(IOC_READ, 0x13, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_DEL_DEV_ASYNC: u32 = ioc(IOC_READ, 0x14, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_UPDATE_SIZE: u32 = ioc(IOC_RW, 0x15, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_QUIESCE_DEV: u32 = ioc(IOC_RW, 0x16, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_TRY_STOP_DEV: u32 = ioc(IOC_RW, 0x17, CTRL_CMD_SIZE);

/// Legacy (raw number) control opcodes, accepted by kernels built with
/// `CONFIG_BLKDEV_UBLK_LEGACY_OPCODES`. Only used when the kernel predates the
/// encoded ones (before 6.4), which we otherwise do not support.
pub const fn legacy_opcode(encoded: u32) -> u32 {
    encoded & 0xff
}

// IO commands (`UBLK_U_IO_*`).
pub const UBLK_U_IO_FETCH_REQ: u32 = ioc(IOC_RW, 0x20, IO_CMD_SIZE);
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = ioc(IOC_RW, 0x21, IO_CMD_SIZE);
pub const UBLK_U_IO_NEED_GET_DATA: u32 = ioc(IOC_RW, 0x22, IO_CMD_SIZE);
pub const UBLK_U_IO_REGISTER_IO_BUF: u32 = ioc(IOC_RW, 0x23, IO_CMD_SIZE);
pub const UBLK_U_IO_UNREGISTER_IO_BUF: u32 = ioc(IOC_RW, 0x24, IO_CMD_SIZE);

// Results of FETCH / COMMIT_AND_FETCH.
pub const UBLK_IO_RES_OK: i32 = 0;
pub const UBLK_IO_RES_NEED_GET_DATA: i32 = 1;
pub const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

// Descriptor area / user copy offsets.
pub const UBLKSRV_CMD_BUF_OFFSET: u64 = 0;
pub const UBLKSRV_IO_BUF_OFFSET: u64 = 0x8000_0000;
pub const UBLK_MAX_QUEUE_DEPTH: u32 = 4096;
pub const UBLK_IO_BUF_BITS: u32 = 25;
pub const UBLK_TAG_OFF: u32 = UBLK_IO_BUF_BITS;
pub const UBLK_TAG_BITS: u32 = 16;
pub const UBLK_QID_OFF: u32 = UBLK_TAG_OFF + UBLK_TAG_BITS;
pub const UBLK_QID_BITS: u32 = 12;
pub const UBLK_MAX_NR_QUEUES: u32 = 1 << UBLK_QID_BITS;

// Feature flags (`UBLK_F_*`).
pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
pub const UBLK_F_USER_COPY: u64 = 1 << 7;
pub const UBLK_F_ZONED: u64 = 1 << 8;
pub const UBLK_F_USER_RECOVERY_FAIL_IO: u64 = 1 << 9;
pub const UBLK_F_UPDATE_SIZE: u64 = 1 << 10;
pub const UBLK_F_AUTO_BUF_REG: u64 = 1 << 11;
pub const UBLK_F_QUIESCE: u64 = 1 << 12;
pub const UBLK_F_PER_IO_DAEMON: u64 = 1 << 13;
pub const UBLK_F_BUF_REG_OFF_DAEMON: u64 = 1 << 14;
pub const UBLK_F_BATCH_IO: u64 = 1 << 15;
pub const UBLK_F_INTEGRITY: u64 = 1 << 16;
pub const UBLK_F_SAFE_STOP_DEV: u64 = 1 << 17;
pub const UBLK_F_NO_AUTO_PART_SCAN: u64 = 1 << 18;
pub const UBLK_F_SHMEM_ZC: u64 = 1 << 19;
pub const UBLK_F_IO_DESC_SIZE: u64 = 1 << 20;

/// Every feature bit with its name, in bit order (used by `ublk features`).
pub const FEATURE_NAMES: &[(u64, &str)] = &[
    (UBLK_F_SUPPORT_ZERO_COPY, "ZERO_COPY"),
    (UBLK_F_URING_CMD_COMP_IN_TASK, "COMP_IN_TASK"),
    (UBLK_F_NEED_GET_DATA, "NEED_GET_DATA"),
    (UBLK_F_USER_RECOVERY, "USER_RECOVERY"),
    (UBLK_F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE"),
    (UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"),
    (UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
    (UBLK_F_USER_COPY, "USER_COPY"),
    (UBLK_F_ZONED, "ZONED"),
    (UBLK_F_USER_RECOVERY_FAIL_IO, "USER_RECOVERY_FAIL_IO"),
    (UBLK_F_UPDATE_SIZE, "UPDATE_SIZE"),
    (UBLK_F_AUTO_BUF_REG, "AUTO_BUF_REG"),
    (UBLK_F_QUIESCE, "QUIESCE"),
    (UBLK_F_PER_IO_DAEMON, "PER_IO_DAEMON"),
    (UBLK_F_BUF_REG_OFF_DAEMON, "BUF_REG_OFF_DAEMON"),
    (UBLK_F_BATCH_IO, "BATCH_IO"),
    (UBLK_F_INTEGRITY, "INTEGRITY"),
    (UBLK_F_SAFE_STOP_DEV, "SAFE_STOP_DEV"),
    (UBLK_F_NO_AUTO_PART_SCAN, "NO_AUTO_PART_SCAN"),
    (UBLK_F_SHMEM_ZC, "SHMEM_ZC"),
    (UBLK_F_IO_DESC_SIZE, "IO_DESC_SIZE"),
];

// Device states.
pub const UBLK_S_DEV_DEAD: u16 = 0;
pub const UBLK_S_DEV_LIVE: u16 = 1;
pub const UBLK_S_DEV_QUIESCED: u16 = 2;
pub const UBLK_S_DEV_FAIL_IO: u16 = 3;

// IO ops and flags (in `ublksrv_io_desc::op_flags`).
pub const UBLK_IO_OP_READ: u8 = 0;
pub const UBLK_IO_OP_WRITE: u8 = 1;
pub const UBLK_IO_OP_FLUSH: u8 = 2;
pub const UBLK_IO_OP_DISCARD: u8 = 3;
pub const UBLK_IO_OP_WRITE_SAME: u8 = 4;
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;
pub const UBLK_IO_F_FAILFAST_DEV: u32 = 1 << 8;
pub const UBLK_IO_F_FAILFAST_TRANSPORT: u32 = 1 << 9;
pub const UBLK_IO_F_FAILFAST_DRIVER: u32 = 1 << 10;
pub const UBLK_IO_F_META: u32 = 1 << 11;
pub const UBLK_IO_F_FUA: u32 = 1 << 13;
pub const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;
pub const UBLK_IO_F_SWAP: u32 = 1 << 16;
pub const UBLK_IO_F_NEED_REG_BUF: u32 = 1 << 17;

// Parameter types and attributes.
pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;
pub const UBLK_PARAM_TYPE_DEVT: u32 = 1 << 2;
pub const UBLK_PARAM_TYPE_ZONED: u32 = 1 << 3;
pub const UBLK_PARAM_TYPE_DMA_ALIGN: u32 = 1 << 4;
pub const UBLK_PARAM_TYPE_SEGMENT: u32 = 1 << 5;
pub const UBLK_PARAM_TYPE_INTEGRITY: u32 = 1 << 6;
pub const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
pub const UBLK_ATTR_ROTATIONAL: u32 = 1 << 1;
pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const UBLK_ATTR_FUA: u32 = 1 << 3;

/// `struct ublksrv_ctrl_cmd`: the 32-byte payload of a control SQE.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublksrv_ctrl_cmd {
    pub dev_id: u32,
    pub queue_id: u16,
    pub len: u16,
    pub addr: u64,
    pub data: [u64; 1],
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublksrv_ctrl_dev_info {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: written by the kernel in the mmapped array.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublksrv_io_desc {
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

impl ublksrv_io_desc {
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
}

/// `struct ublksrv_io_cmd`: the 16-byte payload of an IO SQE.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublksrv_io_cmd {
    pub q_id: u16,
    pub tag: u16,
    pub result: i32,
    pub addr: u64,
}

/// `struct ublk_auto_buf_reg` (passed encoded in `sqe->addr`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublk_auto_buf_reg {
    pub index: u16,
    pub flags: u8,
    pub reserved0: u8,
    pub reserved1: u32,
}
pub const UBLK_AUTO_BUF_REG_FALLBACK: u8 = 1 << 0;

impl ublk_auto_buf_reg {
    pub fn to_sqe_addr(&self) -> u64 {
        self.index as u64 | (self.flags as u64) << 16 | (self.reserved0 as u64) << 24 | (self.reserved1 as u64) << 32
    }
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublk_param_basic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublk_param_discard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublk_param_devt {
    pub char_major: u32,
    pub char_minor: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublk_param_zoned {
    pub max_open_zones: u32,
    pub max_active_zones: u32,
    pub max_zone_append_sectors: u32,
    pub reserved: [u8; 20],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublk_param_dma_align {
    pub alignment: u32,
    pub pad: [u8; 4],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublk_param_segment {
    pub seg_boundary_mask: u64,
    pub max_segment_size: u32,
    pub max_segments: u16,
    pub pad: [u8; 2],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublk_param_integrity {
    pub flags: u32,
    pub max_integrity_segments: u16,
    pub interval_exp: u8,
    pub metadata_size: u8,
    pub pi_offset: u8,
    pub csum_type: u8,
    pub tag_size: u8,
    pub pad: [u8; 5],
}

/// `struct ublk_params` (7.0+ layout, 152 bytes). Older kernels copy only the
/// prefix they know and mask unknown `types` bits.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ublk_params {
    pub len: u32,
    pub types: u32,
    pub basic: ublk_param_basic,
    pub discard: ublk_param_discard,
    pub devt: ublk_param_devt,
    pub zoned: ublk_param_zoned,
    pub dma: ublk_param_dma_align,
    pub seg: ublk_param_segment,
    pub integrity: ublk_param_integrity,
}

/// `sqe->addr` of a FETCH / COMMIT_AND_FETCH carrying `struct ublk_auto_buf_reg`
/// (index, flags; the reserved bytes zero).
pub const fn auto_buf_reg_addr(index: u16, flags: u8) -> u64 {
    index as u64 | (flags as u64) << 16
}

/// Byte offset of the user-copy window of (queue, tag) on `/dev/ublkcN`.
pub const fn user_copy_offset(q_id: u16, tag: u16) -> u64 {
    UBLKSRV_IO_BUF_OFFSET + ((q_id as u64) << UBLK_QID_OFF) + ((tag as u64) << UBLK_TAG_OFF)
}

/// Offset and stride of a queue's descriptor array in the char device mmap.
pub fn desc_queue_stride(page_size: usize) -> usize {
    round_up(UBLK_MAX_QUEUE_DEPTH as usize * std::mem::size_of::<ublksrv_io_desc>(), page_size)
}

pub const fn round_up(v: usize, align: usize) -> usize {
    v.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    #[test]
    fn ctrl_cmd_layout() {
        assert_eq!(size_of::<ublksrv_ctrl_cmd>(), 32);
        assert_eq!(align_of::<ublksrv_ctrl_cmd>(), 8);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, queue_id), 4);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, len), 6);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, addr), 8);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, data), 16);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, dev_path_len), 24);
        assert_eq!(offset_of!(ublksrv_ctrl_cmd, reserved), 28);
    }

    #[test]
    fn dev_info_layout() {
        assert_eq!(size_of::<ublksrv_ctrl_dev_info>(), 64);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, queue_depth), 2);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, state), 4);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, max_io_buf_bytes), 8);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, dev_id), 12);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, ublksrv_pid), 16);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, flags), 24);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, ublksrv_flags), 32);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, owner_uid), 40);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, owner_gid), 44);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, reserved1), 48);
        assert_eq!(offset_of!(ublksrv_ctrl_dev_info, reserved2), 56);
    }

    #[test]
    fn io_structs_layout() {
        assert_eq!(size_of::<ublksrv_io_desc>(), 24);
        assert_eq!(offset_of!(ublksrv_io_desc, nr_sectors), 4);
        assert_eq!(offset_of!(ublksrv_io_desc, start_sector), 8);
        assert_eq!(offset_of!(ublksrv_io_desc, addr), 16);
        assert_eq!(size_of::<ublksrv_io_cmd>(), 16);
        assert_eq!(offset_of!(ublksrv_io_cmd, tag), 2);
        assert_eq!(offset_of!(ublksrv_io_cmd, result), 4);
        assert_eq!(offset_of!(ublksrv_io_cmd, addr), 8);
        assert_eq!(size_of::<ublk_auto_buf_reg>(), 8);
        let r = ublk_auto_buf_reg { index: 0x1234, flags: 1, reserved0: 0, reserved1: 0 };
        assert_eq!(r.to_sqe_addr(), 0x1_1234);
    }

    #[test]
    fn params_layout() {
        assert_eq!(size_of::<ublk_param_basic>(), 32);
        assert_eq!(offset_of!(ublk_param_basic, logical_bs_shift), 4);
        assert_eq!(offset_of!(ublk_param_basic, io_min_shift), 7);
        assert_eq!(offset_of!(ublk_param_basic, max_sectors), 8);
        assert_eq!(offset_of!(ublk_param_basic, chunk_sectors), 12);
        assert_eq!(offset_of!(ublk_param_basic, dev_sectors), 16);
        assert_eq!(offset_of!(ublk_param_basic, virt_boundary_mask), 24);
        assert_eq!(size_of::<ublk_param_discard>(), 20);
        assert_eq!(size_of::<ublk_param_devt>(), 16);
        assert_eq!(size_of::<ublk_param_zoned>(), 32);
        assert_eq!(size_of::<ublk_param_dma_align>(), 8);
        assert_eq!(size_of::<ublk_param_segment>(), 16);
        assert_eq!(size_of::<ublk_param_integrity>(), 16);
        assert_eq!(size_of::<ublk_params>(), 152);
        assert_eq!(offset_of!(ublk_params, basic), 8);
        assert_eq!(offset_of!(ublk_params, discard), 40);
        assert_eq!(offset_of!(ublk_params, devt), 60);
        assert_eq!(offset_of!(ublk_params, zoned), 76);
        assert_eq!(offset_of!(ublk_params, dma), 108);
        assert_eq!(offset_of!(ublk_params, seg), 120);
        assert_eq!(offset_of!(ublk_params, integrity), 136);
    }

    #[test]
    fn command_codes() {
        // Values from the notes (computed with gcc from the 7.1 header).
        assert_eq!(UBLK_U_CMD_GET_QUEUE_AFFINITY, 0x8020_7501);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xC020_7504);
        assert_eq!(UBLK_U_CMD_DEL_DEV, 0xC020_7505);
        assert_eq!(UBLK_U_CMD_START_DEV, 0xC020_7506);
        assert_eq!(UBLK_U_CMD_STOP_DEV, 0xC020_7507);
        assert_eq!(UBLK_U_CMD_SET_PARAMS, 0xC020_7508);
        assert_eq!(UBLK_U_CMD_GET_PARAMS, 0x8020_7509);
        assert_eq!(UBLK_U_CMD_START_USER_RECOVERY, 0xC020_7510);
        assert_eq!(UBLK_U_CMD_END_USER_RECOVERY, 0xC020_7511);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO2, 0x8020_7512);
        assert_eq!(UBLK_U_CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(UBLK_U_CMD_DEL_DEV_ASYNC, 0x8020_7514);
        assert_eq!(UBLK_U_CMD_UPDATE_SIZE, 0xC020_7515);
        assert_eq!(UBLK_U_CMD_QUIESCE_DEV, 0xC020_7516);
        assert_eq!(UBLK_U_CMD_TRY_STOP_DEV, 0xC020_7517);
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xC010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xC010_7521);
        assert_eq!(UBLK_U_IO_NEED_GET_DATA, 0xC010_7522);
        assert_eq!(UBLK_U_IO_REGISTER_IO_BUF, 0xC010_7523);
        assert_eq!(UBLK_U_IO_UNREGISTER_IO_BUF, 0xC010_7524);
        assert_eq!(legacy_opcode(UBLK_U_CMD_ADD_DEV), 0x04);
    }

    #[test]
    fn offsets() {
        assert_eq!(UBLK_QID_OFF, 41);
        assert_eq!(auto_buf_reg_addr(0x1234, UBLK_AUTO_BUF_REG_FALLBACK), 0x1_1234);
        assert_eq!(user_copy_offset(1, 2), 0x8000_0000 + (1 << 41) + (2 << 25));
        assert_eq!(desc_queue_stride(4096), 98304);
        assert_eq!(desc_queue_stride(65536), 131072);
        assert_eq!(FEATURE_NAMES.len(), 21);
        for (i, (bit, _)) in FEATURE_NAMES.iter().enumerate() {
            assert_eq!(*bit, 1u64 << i);
        }
    }
}
