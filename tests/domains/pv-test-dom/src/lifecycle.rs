//! Roles for the lifecycle scenarios (`tests/tests/lifecycle.rs`):
//!
//! - `killer target=<domid|name> after_ms=<n> reason=crash|poweroff|reboot`: sleeps, then
//!   shuts the target down with `SCHEDOP_remote_shutdown` (needs `remote_shutdown`; a name
//!   is looked up with `domctl LIST_DOMAINS`, which needs `domain_control`).
//! - `rebuild index=<n> | name=<s> want=ok|eperm|esrch|einval|ebusy`: asks the hypervisor to
//!   rebuild a boot domain (`domctl REBUILD_BOOT_DOMAIN`) and checks the answer; with
//!   `info=1` also reads the entry (`BOOT_DOMAIN_INFO`) and checks it answers the same way.

use dom_rt::{StartInfo, XenError, domctl, hypercall, println};
use shared_abi::DomId;

use crate::roles::{num, param};

fn want(cmd: &str) -> Result<(), XenError> {
    match param(cmd, "want").unwrap_or("ok") {
        "ok" => Ok(()),
        w => Err(XenError::from_name(&w.to_ascii_uppercase()).unwrap_or(XenError::EINVAL)),
    }
}

pub fn killer(si: &StartInfo) {
    let name = si.name();
    let cmd = si.cmdline();
    let after = num(cmd, "after_ms", 100);
    let reason_name = param(cmd, "reason").unwrap_or("crash");
    let reason = match reason_name {
        "poweroff" => 0,
        "reboot" => 1,
        _ => 3,
    };
    let Some(target) = param(cmd, "target") else {
        println!("RESULT {name} fail no target=");
        return;
    };
    let _ = dom_rt::time::sleep(after * 1_000_000);
    let id: Option<DomId> = target.parse().ok().or_else(|| {
        domctl::list_domains().ok()?.iter().find_map(|d| {
            (d.name() == target && d.state == shared_abi::hypercall_args::domctl::state::RUNNING)
                .then_some(d.domid)
        })
    });
    let Some(id) = id else {
        println!("RESULT {name} fail no running domain {target}");
        return;
    };
    match hypercall::remote_shutdown(id, reason) {
        Ok(()) => println!("RESULT {name} pass shut {target} (domain {id}) down: {reason_name}"),
        Err(e) => println!("RESULT {name} fail remote_shutdown of domain {id}: {e:?}"),
    }
}

pub fn rebuild(si: &StartInfo) {
    let name = si.name();
    let cmd = si.cmdline();
    let expected = want(cmd).map(|_| 0u16);
    let got = match param(cmd, "name") {
        Some(n) => domctl::rebuild_boot_domain_named(n),
        None => domctl::rebuild_boot_domain(num(cmd, "index", 0) as u32),
    };
    let mut ok = got.map(|_| 0u16) == expected;
    let mut details = alloc::format!("rebuild gave {got:?}");
    if num(cmd, "info", 0) == 1 && param(cmd, "name").is_none() {
        let info = domctl::boot_domain_info(num(cmd, "index", 0) as u32).map(|_| 0u16);
        // Info is never EBUSY: a refused rebuild of an existing entry still describes it.
        let want_info = match expected {
            Err(XenError::EBUSY) => Ok(0),
            e => e,
        };
        ok &= info == want_info;
        details = alloc::format!("{details}, info gave {info:?}");
    }
    println!(
        "RESULT {name} {} {details} (wanted {:?})",
        if ok { "pass" } else { "fail" },
        expected
    );
}
