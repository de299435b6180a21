//! Connection steering across generations of one reuseport group: an eBPF
//! `SK_REUSEPORT` program that sends every new connection to the newest generation's
//! listener, so the old generation can drain and close without losing connections.
//!
//! Kernel requirements (probed by [`probe`], never inferred from the release):
//! `SK_REUSEPORT` programs and `REUSEPORT_SOCKARRAY` maps (Linux 4.19),
//! `SELECT_OR_MIGRATE` (5.14) for queued connections of a closing listener to migrate too;
//! CAP_BPF and CAP_NET_ADMIN (or root).
//!
//! One [`Steering`] per reuseport group (per bound address). It owns two maps and the
//! program (see `bpf/README.md` for the instruction listing):
//!
//! - `cfg`: ARRAY `u32 → u32`, three entries. `cfg[0]`: 0 means "kernel default
//!   selection", `k + 1` means "select slot `k` of `socks`". `cfg[1]`, the probe: 0, or a
//!   TCP source port and a slot (`port << 16 | k + 1`): a connection from that port
//!   selects slot `k` whatever the others say, so the agent can check that a generation
//!   that is not serving yet accepts connections ([`Steering::probe_from`]). `cfg[2]`, the
//!   canary: 0, or a threshold and a slot (`t << 16 | k + 1`): a connection whose flow
//!   hash (the kernel's hash of its 4-tuple, low 16 bits) is below `t` selects slot `k`,
//!   so that share of new connections reaches a new generation ([`Steering::canary`]);
//! - `socks`: REUSEPORT_SOCKARRAY `u32 → u64` with two slots, used alternately.
//!
//! [`Steering::steer_to`] performs, in order:
//!
//! 1. insert the new listener into the slot not currently selected (the selected slot,
//!    and so the serving listener, is untouched until step 2);
//! 2. set `cfg[0]` to that slot: every later SYN, and with `SELECT_OR_MIGRATE` every
//!    request migrating off a closing listener, selects the new listener.
//!
//! A closed socket leaves the sockarray by itself; a lookup of an empty slot fails and
//! the program returns `SK_PASS`, so the kernel's own hash selection applies (nothing is
//! dropped). A connection whose source port matches the probe only by chance (another
//! host's client using the same port while a probe runs, a fraction of a second per
//! deploy) reaches the probed generation, which is up and accepting by then.
//! An agent that adopts the workers of an earlier one recovers the group's maps by the ids
//! it recorded ([`Steering::ids`], [`Steering::recover`]): the program stays attached to
//! the group while any of its sockets lives, and a socket can be in one sockarray only, so
//! a fresh program could not steer to the listeners the earlier agent inserted.
//!
//! What this module does not do: detach the program or pin maps.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys::bpf;

pub use crate::sys::bpf::ProgLoadError;

/// What this kernel/privilege allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SteeringSupport {
    /// `SELECT_OR_MIGRATE` loads: new and migrating connections are steered (5.14).
    Migrate,
    /// Only `SELECT`: new connections are steered; a closing listener's queue is reset
    /// unless drained first (4.19 to 5.13).
    Select,
    /// No steering, and why.
    Unavailable(String),
}

/// Errors of loading, attaching and updating the steering program.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    /// A map could not be created.
    #[error("failed to create the steering map {map}")]
    CreateMap {
        /// Which map.
        map: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The program did not load.
    #[error("failed to load the steering program")]
    Load(#[source] ProgLoadError),
    /// The socket is not in a reuseport group.
    #[error("failed to attach the steering program: the socket does not have SO_REUSEPORT set")]
    NotReuseport,
    /// The socket's options could not be read.
    #[error("failed to read SO_REUSEPORT of the socket")]
    Inspect(#[source] io::Error),
    /// The listener could not be identified (`fstat`).
    #[error("failed to fstat the listener to steer to")]
    Identify(#[source] io::Error),
    /// `SO_ATTACH_REUSEPORT_EBPF` failed.
    #[error("failed to attach the steering program to the reuseport group")]
    Attach(#[source] io::Error),
    /// The listener could not be put in the sockarray (it must be a listening member of
    /// the group).
    #[error(
        "failed to insert the listener in steering slot {slot} (it must be a listening SO_REUSEPORT socket of the group)"
    )]
    Insert {
        /// Which slot.
        slot: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The probe entry could not be set or cleared.
    #[error("failed to set the steering probe (slot {slot})")]
    Probe {
        /// Which slot (2 when clearing).
        slot: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The canary entry could not be set or cleared.
    #[error("failed to set the steering canary (slot {slot})")]
    Canary {
        /// Which slot (2 when clearing).
        slot: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A map of an earlier agent could not be recovered by its id.
    #[error("failed to recover the steering map {map} of an earlier agent")]
    Recover {
        /// Which map.
        map: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The listener left its slot (shut down) as steering was switched to it; switched
    /// back.
    #[error(
        "the listener left steering slot {slot} as steering was switched to it (it was shut down)"
    )]
    Left {
        /// Which slot.
        slot: u32,
    },
    /// The selected slot could not be switched.
    #[error("failed to switch steering to slot {slot}")]
    Flip {
        /// Which slot.
        slot: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// Slots in the sockarray: the serving listener and the next one.
const SLOTS: u32 = 2;
/// Entries of `cfg`: the serving slot, the probe, the canary.
const CFG_ENTRIES: u32 = 3;
/// `cfg[0]`: 0, or the serving slot + 1.
const CFG_SERVING: u32 = 0;
/// `cfg[1]`: 0, or the probe port (as the program reads it) << 16 | its slot + 1.
const CFG_PROBE: u32 = 1;
/// `cfg[2]`: 0, or a hash threshold << 16 | the canary's slot + 1.
const CFG_CANARY: u32 = 2;
/// Offset of `hash` in `struct sk_reuseport_md` (data, data_end, len, eth_protocol,
/// ip_protocol, bind_inany, hash).
const CTX_HASH: i16 = 32;
/// Instruction slots of [`program`].
const PROGRAM_LEN: usize = 57;
/// Helper ids (`enum bpf_func_id`).
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_SK_SELECT_REUSEPORT: i32 = 82;
/// `SK_PASS`.
const SK_PASS: i32 = 1;
/// The program's license (the helpers used are not GPL-only, but this is simplest).
const LICENSE: &CStr = c"GPL";

/// A loaded steering program attached to one reuseport group.
#[derive(Debug)]
pub struct Steering {
    cfg: OwnedFd,
    socks: OwnedFd,
    /// The program, when this agent loaded it (a recovered one is held by the group).
    _prog: Option<OwnedFd>,
    migrate: bool,
    /// The slot `cfg` selects, if any.
    active: Option<u32>,
    /// The identity (device, inode) of the socket last inserted in each slot.
    occupant: [Option<(u64, u64)>; SLOTS as usize],
}

impl Steering {
    /// Loads the program and maps for one reuseport group and attaches it through
    /// `member`, any bound SO_REUSEPORT socket of the group.
    pub fn attach(member: BorrowedFd<'_>) -> Result<Steering, SteeringError> {
        let reuseport = rustix::net::sockopt::socket_reuseport(member)
            .map_err(|e| SteeringError::Inspect(e.into()))?;
        if !reuseport {
            return Err(SteeringError::NotReuseport);
        }
        let (cfg, socks) = create_maps()?;
        let (prog, migrate) = load(cfg.as_fd(), socks.as_fd())?;
        bpf::attach_reuseport_prog(member, prog.as_fd()).map_err(SteeringError::Attach)?;
        Ok(Steering {
            cfg,
            socks,
            _prog: Some(prog),
            migrate,
            active: None,
            occupant: [None; SLOTS as usize],
        })
    }

    /// From now on every new connection of the group goes to `listener` (a listening
    /// member of the group): insert it in the sockarray, then flip the cfg index.
    pub fn steer_to(&mut self, listener: BorrowedFd<'_>) -> Result<(), SteeringError> {
        let before = self.active;
        let slot = self.stage(listener)?;
        bpf::array_set_u32(self.cfg.as_fd(), CFG_SERVING, slot + 1)
            .map_err(|source| SteeringError::Flip { slot, source })?;
        self.active = Some(slot);
        // Shut down between `stage`'s look and the switch, it left the slot: new
        // connections would get the kernel's own choice. Back to the slot served before.
        if before != Some(slot) && !self.holds(slot, listener) {
            self.occupant[slot as usize] = None;
            self.select(before)?;
            return Err(SteeringError::Left { slot });
        }
        Ok(())
    }

    /// The slot new connections go to now (`None`: the kernel's own selection), for
    /// [`Steering::select`].
    pub fn serving_slot(&self) -> Option<u32> {
        self.active
    }

    /// New connections go to `slot` again, one [`Steering::serving_slot`] returned before
    /// a later [`Steering::steer_to`]: its listener is still there (`steer_to` inserts
    /// into the slot not selected), unless it closed meanwhile. For a flip of a site's
    /// groups that failed on one of them: the others go back.
    pub fn select(&mut self, slot: Option<u32>) -> Result<(), SteeringError> {
        bpf::array_set_u32(self.cfg.as_fd(), CFG_SERVING, slot.map_or(0, |s| s + 1)).map_err(
            |source| SteeringError::Flip {
                slot: slot.unwrap_or(SLOTS),
                source,
            },
        )?;
        self.active = slot;
        Ok(())
    }

    /// Connections from local TCP port `port` (the agent's probe socket, bound before it
    /// connects) go to `listener`, which need not be serving; every other connection
    /// is steered as before. Replaces any earlier probe.
    pub fn probe_from(&mut self, port: u16, listener: BorrowedFd<'_>) -> Result<(), SteeringError> {
        let slot = self.stage(listener)?;
        bpf::array_set_u32(self.cfg.as_fd(), CFG_PROBE, probe_entry(port, slot))
            .map_err(|source| SteeringError::Probe { slot, source })
    }

    /// Sends a share of new connections, those whose flow hash (its low 16 bits) is
    /// below `threshold` out of 65536, to `listener`, which need not be serving; the rest
    /// go to the serving listener. Replaces any earlier canary; the probe still wins.
    pub fn canary(
        &mut self,
        listener: BorrowedFd<'_>,
        threshold: u16,
    ) -> Result<(), SteeringError> {
        let slot = self.stage(listener)?;
        let entry = (u32::from(threshold) << 16) | (slot + 1);
        bpf::array_set_u32(self.cfg.as_fd(), CFG_CANARY, entry)
            .map_err(|source| SteeringError::Canary { slot, source })
    }

    /// Ends the canary: every new connection goes to the serving listener.
    pub fn clear_canary(&mut self) -> Result<(), SteeringError> {
        bpf::array_set_u32(self.cfg.as_fd(), CFG_CANARY, 0).map_err(|source| {
            SteeringError::Canary {
                slot: SLOTS,
                source,
            }
        })
    }

    /// Ends the probe: connections from its port are steered like every other.
    pub fn clear_probe(&mut self) -> Result<(), SteeringError> {
        bpf::array_set_u32(self.cfg.as_fd(), CFG_PROBE, 0).map_err(|source| SteeringError::Probe {
            slot: SLOTS,
            source,
        })
    }

    /// Puts `listener` in a slot without selecting it: the slot it already sits in, else
    /// the one not serving (the serving slot is never overwritten while selected).
    fn stage(&mut self, listener: BorrowedFd<'_>) -> Result<u32, SteeringError> {
        let id = identity(listener).map_err(SteeringError::Identify)?;
        // A socket can be in one sockarray slot only. One shut down since it was put there
        // (by a worker holding it) left the slot by itself: inserted again, it is refused,
        // rather than a flip selecting an empty slot (the kernel's own choice, which is the
        // old generation's listener).
        if let Some(slot) = (0..SLOTS).find(|&s| self.occupant[s as usize] == Some(id)) {
            if self.holds(slot, listener) {
                return Ok(slot);
            }
            self.occupant[slot as usize] = None;
        }
        let slot = match self.active {
            Some(a) => (a + 1) % SLOTS,
            None => 0,
        };
        bpf::sockarray_insert(self.socks.as_fd(), slot, listener)
            .map_err(|source| SteeringError::Insert { slot, source })?;
        self.occupant[slot as usize] = Some(id);
        Ok(slot)
    }

    /// Whether `slot` of the sockarray holds `listener` (their socket cookies match; an
    /// empty slot's lookup fails).
    fn holds(&self, slot: u32, listener: BorrowedFd<'_>) -> bool {
        let Ok(cookie) = rustix::net::sockopt::socket_cookie(listener) else {
            return false;
        };
        bpf::map_lookup(self.socks.as_fd(), slot).is_ok_and(|v| u64::from_ne_bytes(v) == cookie)
    }

    /// The ids of its two maps (`cfg`, `socks`), for the record of a running agent.
    pub fn ids(&self) -> io::Result<[u32; 2]> {
        Ok([
            bpf::map_info(self.cfg.as_fd())?.id,
            bpf::map_info(self.socks.as_fd())?.id,
        ])
    }

    /// The steering an earlier agent attached, from the ids of its maps (`ids`), with
    /// `serving`, the listener of the generation kept, steered to (it is in the slot
    /// `cfg` selects unless the generation kept is another). The canary and the probe
    /// end (a deploy in flight is over). `migrate`: whether the program was loaded with
    /// `SELECT_OR_MIGRATE` (this kernel's support says).
    pub fn recover(
        ids: [u32; 2],
        serving: BorrowedFd<'_>,
        migrate: bool,
    ) -> Result<Steering, SteeringError> {
        let open = |id: u32, map: &'static str, want: (u32, u32, u32, u32)| {
            let fd = bpf::map_get_fd_by_id(id)
                .map_err(|source| SteeringError::Recover { map, source })?;
            let info = bpf::map_info(fd.as_fd())
                .map_err(|source| SteeringError::Recover { map, source })?;
            let got = (
                info.map_type,
                info.key_size,
                info.value_size,
                info.max_entries,
            );
            if got != want {
                return Err(SteeringError::Recover {
                    map,
                    source: io::Error::other(format!(
                        "map {id} is not the agent's (type, key, value, entries {got:?})"
                    )),
                });
            }
            Ok(fd)
        };
        let cfg = open(ids[0], "cfg", (bpf::BPF_MAP_TYPE_ARRAY, 4, 4, CFG_ENTRIES))?;
        let socks = open(
            ids[1],
            "socks",
            (bpf::BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, SLOTS),
        )?;
        let read = |map: BorrowedFd<'_>, key: u32| {
            bpf::map_lookup(map, key)
                .map_err(|source| SteeringError::Recover { map: "cfg", source })
        };
        let selected = u32::from_ne_bytes(
            read(cfg.as_fd(), CFG_SERVING)?[..4]
                .try_into()
                .expect("4 of 8 bytes"),
        );
        let active = selected.checked_sub(1).filter(|s| *s < SLOTS);
        let mut st = Steering {
            cfg,
            socks,
            _prog: None,
            migrate,
            active,
            occupant: [None; SLOTS as usize],
        };
        // The selected slot holds `serving` if its socket cookie is `serving`'s.
        if let Some(a) = active.filter(|a| st.holds(*a, serving)) {
            st.occupant[a as usize] = Some(identity(serving).map_err(SteeringError::Identify)?);
        }
        st.clear_canary()?;
        st.clear_probe()?;
        st.steer_to(serving)?;
        Ok(st)
    }

    /// Whether queued connections of a closing listener migrate (SELECT_OR_MIGRATE loaded).
    pub fn migrates(&self) -> bool {
        self.migrate
    }
}

/// What this kernel/privilege allows: creates the maps and loads the program, then
/// drops them. Cheap (two maps, one 21-slot program) and uncached.
pub fn probe() -> SteeringSupport {
    let (cfg, socks) = match create_maps() {
        Ok(m) => m,
        Err(e) => return SteeringSupport::Unavailable(chain(&e)),
    };
    match load(cfg.as_fd(), socks.as_fd()) {
        Ok((_, true)) => SteeringSupport::Migrate,
        Ok((_, false)) => SteeringSupport::Select,
        Err(e) => SteeringSupport::Unavailable(chain(&e)),
    }
}

/// Loads `insns` (raw `struct bpf_insn`s, 8 bytes each) as an `SK_REUSEPORT` program for
/// `SELECT`, attached to nothing. The agent loads only its own program (through
/// [`Steering::attach`] and [`probe`]); this shows, with a program the verifier refuses,
/// what a refusal reports: the kernel's error and the verifier's log.
pub fn load_select_program(insns: &[[u8; 8]]) -> Result<OwnedFd, ProgLoadError> {
    bpf::prog_load_sk_reuseport(insns, LICENSE, bpf::BPF_SK_REUSEPORT_SELECT)
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// `cfg[1]` for a probe from `port` to `slot`: the program loads the TCP source port's
/// two bytes (network order) as a native u16, so the port is stored the same way.
fn probe_entry(port: u16, slot: u32) -> u32 {
    let as_loaded = u16::from_ne_bytes(port.to_be_bytes());
    (u32::from(as_loaded) << 16) | (slot + 1)
}

fn create_maps() -> Result<(OwnedFd, OwnedFd), SteeringError> {
    let cfg = bpf::map_create(bpf::BPF_MAP_TYPE_ARRAY, 4, 4, CFG_ENTRIES)
        .map_err(|source| SteeringError::CreateMap { map: "cfg", source })?;
    let socks =
        bpf::map_create(bpf::BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, SLOTS).map_err(|source| {
            SteeringError::CreateMap {
                map: "socks",
                source,
            }
        })?;
    Ok((cfg, socks))
}

/// Loads with SELECT_OR_MIGRATE, or SELECT where the kernel rejects it with EINVAL.
/// `HATCHERY_STEERING=select` asks for SELECT alone, the path of kernels 4.19 to 5.13, so
/// the drain that stands in for migration is tested on newer ones too.
fn load(cfg: BorrowedFd<'_>, socks: BorrowedFd<'_>) -> Result<(OwnedFd, bool), SteeringError> {
    let insns = program(map_fd(cfg), map_fd(socks));
    if std::env::var("HATCHERY_STEERING").is_ok_and(|v| v == "select") {
        return bpf::prog_load_sk_reuseport(&insns, LICENSE, bpf::BPF_SK_REUSEPORT_SELECT)
            .map(|fd| (fd, false))
            .map_err(SteeringError::Load);
    }
    match bpf::prog_load_sk_reuseport(&insns, LICENSE, bpf::BPF_SK_REUSEPORT_SELECT_OR_MIGRATE) {
        Ok(fd) => Ok((fd, true)),
        // remove once 5.14 is the floor
        Err(e) if e.source.raw_os_error() == Some(libc::EINVAL) => {
            bpf::prog_load_sk_reuseport(&insns, LICENSE, bpf::BPF_SK_REUSEPORT_SELECT)
                .map(|fd| (fd, false))
                .map_err(SteeringError::Load)
        }
        Err(e) => Err(SteeringError::Load(e)),
    }
}

fn map_fd(fd: BorrowedFd<'_>) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

// Instruction encoding (`struct bpf_insn`: code, dst:4 | src:4 << 4, off: i16, imm: i32,
// little-endian on the supported targets).
const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_ALU: u8 = 0x04;
const BPF_JMP: u8 = 0x05;
const BPF_ALU64: u8 = 0x07;
const BPF_W: u8 = 0x00;
const BPF_H: u8 = 0x08;
const BPF_DW: u8 = 0x18;
const BPF_IMM: u8 = 0x00;
const BPF_MEM: u8 = 0x60;
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;
const BPF_ADD: u8 = 0x00;
const BPF_RSH: u8 = 0x70;
const BPF_AND: u8 = 0x50;
const BPF_MOV: u8 = 0xb0;
const BPF_JA: u8 = 0x00;
const BPF_JEQ: u8 = 0x10;
const BPF_JGT: u8 = 0x20;
const BPF_JGE: u8 = 0x30;
const BPF_JNE: u8 = 0x50;
const BPF_CALL: u8 = 0x80;
const BPF_EXIT: u8 = 0x90;
const BPF_PSEUDO_MAP_FD: u8 = 1;

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const R10: u8 = 10;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    [code, (src << 4) | dst, o[0], o[1], i[0], i[1], i[2], i[3]]
}

/// The steering program with the two map fds (see `bpf/README.md`, `bpf/steer.c`).
pub(crate) fn program(cfg: i32, socks: i32) -> Vec<[u8; 8]> {
    let mut p = Vec::with_capacity(PROGRAM_LEN);
    let mov64_reg = |dst, src| insn(BPF_ALU64 | BPF_MOV | BPF_X, dst, src, 0, 0);
    let add64_imm = |dst, imm| insn(BPF_ALU64 | BPF_ADD | BPF_K, dst, 0, 0, imm);
    let ld_map = |dst, fd| {
        [
            insn(BPF_LD | BPF_DW | BPF_IMM, dst, BPF_PSEUDO_MAP_FD, 0, fd),
            insn(0, 0, 0, 0, 0),
        ]
    };
    // r0 = cfg[key] or NULL (clobbers r1-r5).
    let lookup_cfg = |p: &mut Vec<[u8; 8]>, key| {
        p.push(insn(BPF_ST | BPF_MEM | BPF_W, R10, 0, -4, key)); // *(u32 *)(r10 - 4) = key
        p.push(mov64_reg(R2, R10));
        p.push(add64_imm(R2, -4)); // r2 = &key
        p.extend(ld_map(R1, cfg)); // r1 = &cfg (two slots)
        p.push(insn(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM));
    };
    p.push(mov64_reg(R6, R1)); // 0: r6 = ctx
    // The probe: a connection from the agent's probe port goes to the probe's slot.
    p.push(insn(BPF_LDX | BPF_MEM | BPF_DW, R2, R6, 0, 0)); // 1: r2 = ctx->data
    p.push(insn(BPF_LDX | BPF_MEM | BPF_DW, R3, R6, 8, 0)); // 2: r3 = ctx->data_end
    p.push(mov64_reg(R4, R2)); // 3: r4 = r2
    p.push(add64_imm(R4, 2)); // 4: r4 += 2
    p.push(insn(BPF_JMP | BPF_JGT | BPF_X, R4, R3, 15, 0)); // 5: if r4 > r3 goto 21
    p.push(insn(BPF_LDX | BPF_MEM | BPF_H, R7, R2, 0, 0)); // 6: r7 = TCP source port
    lookup_cfg(&mut p, 1); // 7-12: r0 = &cfg[1]
    p.push(insn(BPF_JMP | BPF_JEQ | BPF_K, R0, 0, 7, 0)); // 13: if !r0 goto 21
    p.push(insn(BPF_LDX | BPF_MEM | BPF_W, R1, R0, 0, 0)); // 14: r1 = cfg[1]
    p.push(insn(BPF_JMP | BPF_JEQ | BPF_K, R1, 0, 5, 0)); // 15: if r1 == 0 goto 21
    p.push(mov64_reg(R2, R1)); // 16: r2 = r1
    p.push(insn(BPF_ALU64 | BPF_RSH | BPF_K, R2, 0, 0, 16)); // 17: r2 >>= 16 (the port)
    p.push(insn(BPF_JMP | BPF_JNE | BPF_X, R2, R7, 2, 0)); // 18: if r2 != r7 goto 21
    p.push(insn(BPF_ALU64 | BPF_AND | BPF_K, R1, 0, 0, 0xffff)); // 19: r1 &= 0xffff
    p.push(insn(BPF_JMP | BPF_JA, 0, 0, 24, 0)); // 20: goto 45 (r1 holds the slot + 1)
    // A canary: connections whose hash falls under the threshold go to the canary's slot.
    lookup_cfg(&mut p, 2); // 21-26: r0 = &cfg[2]
    p.push(insn(BPF_JMP | BPF_JEQ | BPF_K, R0, 0, 9, 0)); // 27: if !r0 goto 37
    p.push(insn(BPF_LDX | BPF_MEM | BPF_W, R1, R0, 0, 0)); // 28: r1 = cfg[2]
    p.push(insn(BPF_JMP | BPF_JEQ | BPF_K, R1, 0, 7, 0)); // 29: if r1 == 0 goto 37
    p.push(insn(BPF_LDX | BPF_MEM | BPF_W, R2, R6, CTX_HASH, 0)); // 30: r2 = ctx->hash
    p.push(insn(BPF_ALU64 | BPF_AND | BPF_K, R2, 0, 0, 0xffff)); // 31: r2 &= 0xffff
    p.push(mov64_reg(R3, R1)); // 32: r3 = r1
    p.push(insn(BPF_ALU64 | BPF_RSH | BPF_K, R3, 0, 0, 16)); // 33: r3 >>= 16 (the threshold)
    p.push(insn(BPF_JMP | BPF_JGE | BPF_X, R2, R3, 2, 0)); // 34: if r2 >= r3 goto 37
    p.push(insn(BPF_ALU64 | BPF_AND | BPF_K, R1, 0, 0, 0xffff)); // 35: r1 &= 0xffff
    p.push(insn(BPF_JMP | BPF_JA, 0, 0, 8, 0)); // 36: goto 45 (r1 holds the slot + 1)
    // Everything else goes to the serving slot.
    lookup_cfg(&mut p, 0); // 37-42: r0 = &cfg[0]
    p.push(insn(BPF_JMP | BPF_JEQ | BPF_K, R0, 0, 11, 0)); // 43: if !r0 goto 55
    p.push(insn(BPF_LDX | BPF_MEM | BPF_W, R1, R0, 0, 0)); // 44: r1 = cfg[0]
    p.push(insn(BPF_JMP | BPF_JEQ | BPF_K, R1, 0, 9, 0)); // 45: if r1 == 0 goto 55
    p.push(insn(BPF_ALU | BPF_ADD | BPF_K, R1, 0, 0, -1)); // 46: w1 -= 1 (the slot)
    p.push(insn(BPF_STX | BPF_MEM | BPF_W, R10, R1, -8, 0)); // 47: *(u32 *)(r10 - 8) = w1
    p.push(mov64_reg(R1, R6)); // 48: r1 = ctx
    p.extend(ld_map(R2, socks)); // 49-50: r2 = &socks
    p.push(mov64_reg(R3, R10)); // 51: r3 = r10
    p.push(add64_imm(R3, -8)); // 52: r3 = &slot
    p.push(insn(BPF_ALU64 | BPF_MOV | BPF_K, R4, 0, 0, 0)); // 53: r4 = 0 (flags)
    p.push(insn(
        BPF_JMP | BPF_CALL,
        0,
        0,
        0,
        BPF_FUNC_SK_SELECT_REUSEPORT,
    )); // 54
    p.push(insn(BPF_ALU64 | BPF_MOV | BPF_K, R0, 0, 0, SK_PASS)); // 55: r0 = SK_PASS
    p.push(insn(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)); // 56: exit
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders the program as `bpf/steer.golden` spells it: one instruction per line as
    /// 16 hex digits, with the map fd immediates written `{cfg}` / `{socks}`.
    fn render(cfg_fd: i32, socks_fd: i32) -> Vec<String> {
        program(cfg_fd, socks_fd)
            .iter()
            .map(|i| {
                let hex: String = i.iter().map(|b| format!("{b:02x}")).collect();
                let imm = i32::from_le_bytes([i[4], i[5], i[6], i[7]]);
                if i[0] == (BPF_LD | BPF_DW | BPF_IMM) && imm == cfg_fd {
                    format!("{}{{cfg}}", &hex[..8])
                } else if i[0] == (BPF_LD | BPF_DW | BPF_IMM) && imm == socks_fd {
                    format!("{}{{socks}}", &hex[..8])
                } else {
                    hex
                }
            })
            .collect()
    }

    #[test]
    fn encoder_matches_the_golden_file() {
        let golden = include_str!("../bpf/steer.golden");
        let want: Vec<&str> = golden
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .collect();
        let got = render(0x1111_1111, 0x2222_2222);
        assert_eq!(
            got, want,
            "regenerate with: cargo test --lib print_golden -- --ignored --nocapture"
        );
    }

    /// Prints the golden file from the encoder (review the diff before committing it).
    #[test]
    #[ignore = "prints bpf/steer.golden for regeneration"]
    fn print_golden() {
        for line in render(0x1111_1111, 0x2222_2222) {
            println!("{line}");
        }
    }

    /// Every jump lands where the listing says: the probe's misses on the canary (21,
    /// `key = 2`), the canary's misses on the serving path (37, `key = 0`), the probe's and
    /// the canary's hits on the select (45, with the slot + 1 in r1), the serving path's
    /// misses on `SK_PASS` (55).
    #[test]
    fn jumps_land_on_their_labels() {
        let p = program(3, 4);
        assert_eq!(p.len(), PROGRAM_LEN);
        let mut jumps = Vec::new();
        for (at, i) in p.iter().enumerate() {
            let class = i[0] & 0x07;
            let op = i[0] & 0xf0;
            if class == BPF_JMP && op != BPF_CALL && op != BPF_EXIT {
                let off = i16::from_le_bytes([i[2], i[3]]);
                let target = at + 1 + usize::try_from(off).expect("forward jump");
                jumps.push((at, target));
            }
        }
        assert_eq!(
            jumps,
            vec![
                (5, 21),
                (13, 21),
                (15, 21),
                (18, 21),
                (20, 45),
                (27, 37),
                (29, 37),
                (34, 37),
                (36, 45),
                (43, 55),
                (45, 55)
            ]
        );
        assert_eq!(p[21], insn(BPF_ST | BPF_MEM | BPF_W, R10, 0, -4, 2));
        assert_eq!(p[37], insn(BPF_ST | BPF_MEM | BPF_W, R10, 0, -4, 0));
        assert_eq!(p[45], insn(BPF_JMP | BPF_JEQ | BPF_K, R1, 0, 9, 0));
        assert_eq!(p[55], insn(BPF_ALU64 | BPF_MOV | BPF_K, R0, 0, 0, SK_PASS));
    }
}
