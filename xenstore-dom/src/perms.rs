//! Node permissions: the owner-plus-entries list, its wire strings and Xen's access rule.
//!
//! The first entry names the owner and the access of every domain not listed later. A
//! privileged connection, the owner, or a domain whose target is the owner gets everything;
//! otherwise the first later entry naming the domain (or its target) decides, else the first.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::errno::XenError;

pub const NONE: u8 = 0;
pub const READ: u8 = 1;
pub const WRITE: u8 = 2;
pub const OWNER: u8 = 8;

/// One `<letter><domid>` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    pub id: DomId,
    /// `READ | WRITE` subset.
    pub access: u8,
}

/// A node's permission list, shared between nodes that inherited it.
pub type Perms = Arc<[Perm]>;

/// Who is asking: enough of a connection to decide access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Who {
    pub domid: DomId,
    pub privileged: bool,
    pub target: Option<DomId>,
}

impl Who {
    fn is(&self, id: DomId) -> bool {
        id == self.domid || self.target == Some(id)
    }
}

/// `perm_for_conn`: the access bits `who` has on a node with `perms`.
pub fn access(who: &Who, perms: &[Perm]) -> u8 {
    let Some(first) = perms.first() else {
        return if who.privileged {
            READ | WRITE | OWNER
        } else {
            NONE
        };
    };
    if who.privileged || who.is(first.id) {
        return READ | WRITE | OWNER;
    }
    perms[1..]
        .iter()
        .find(|p| who.is(p.id))
        .unwrap_or(first)
        .access
}

/// Parse one wire entry such as `r5`.
pub fn parse_one(s: &[u8]) -> Result<Perm, XenError> {
    let (&letter, digits) = s.split_first().ok_or(XenError::EINVAL)?;
    let access = match letter {
        b'n' => NONE,
        b'r' => READ,
        b'w' => WRITE,
        b'b' => READ | WRITE,
        _ => return Err(XenError::EINVAL),
    };
    if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(XenError::EINVAL);
    }
    let id: u32 = core::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or(XenError::EINVAL)?;
    let id = DomId::try_from(id).map_err(|_| XenError::EINVAL)?;
    Ok(Perm { id, access })
}

/// Wire form of one entry.
pub fn format_one(p: &Perm) -> String {
    let letter = match p.access & (READ | WRITE) {
        READ => 'r',
        WRITE => 'w',
        x if x == READ | WRITE => 'b',
        _ => 'n',
    };
    format!("{letter}{}", p.id)
}

/// Wire payload of GET_PERMS: every entry NUL-terminated.
pub fn to_payload(perms: &[Perm]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in perms {
        out.extend_from_slice(format_one(p).as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(domid: DomId) -> Who {
        Who {
            domid,
            privileged: false,
            target: None,
        }
    }

    #[test]
    fn parse_and_format_round_trip() {
        for s in ["n0", "r5", "w12", "b65535"] {
            assert_eq!(format_one(&parse_one(s.as_bytes()).unwrap()), s);
        }
        for bad in ["", "x1", "r", "r-1", "r65536", "r1a", "r123456"] {
            assert_eq!(parse_one(bad.as_bytes()), Err(XenError::EINVAL), "{bad}");
        }
    }

    #[test]
    fn access_follows_owner_then_entries_then_default() {
        let perms = [
            Perm {
                id: 1,
                access: NONE,
            },
            Perm {
                id: 2,
                access: READ,
            },
        ];
        assert_eq!(access(&who(1), &perms), READ | WRITE | OWNER);
        assert_eq!(access(&who(2), &perms), READ);
        assert_eq!(access(&who(3), &perms), NONE);
        let priv0 = Who {
            domid: 0,
            privileged: true,
            target: None,
        };
        assert_eq!(access(&priv0, &perms), READ | WRITE | OWNER);
        let stub = Who {
            domid: 9,
            privileged: false,
            target: Some(1),
        };
        assert_eq!(access(&stub, &perms), READ | WRITE | OWNER);
    }
}
