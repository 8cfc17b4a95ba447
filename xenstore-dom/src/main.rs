//! `xenstore-dom` on the host: the store served on unix sockets for Xen's stock tools.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use xenstore_dom::host::{Daemon, DaemonConfig, Role, parse_domain_socket};
use xenstore_dom::quota::{NAMES, Quotas};

const QUOTA_HELP: &str = "Quotas bind unprivileged domains (defaults are Xen's):
  nodes=1000              nodes a domain may own (ENOSPC)
  watches=128             watches per domain (E2BIG)
  outstanding=20          requests a ring transport takes before replies are read
  transactions=10         open transactions per domain (ENOSPC)
  transaction-nodes=1024  nodes one transaction may touch (ENOSPC)
  node-permissions=5      entries in a permission list (ENOSPC)
  path-max=2048           path length below /local/domain/<id> (EINVAL)
  node-size=2048          16 + 8*perms + value + child names, bytes (ENOSPC)
Socket clients are privileged domain 0, as in Xen; they are exempt from these but
limited per connection by --priv-watches and --priv-transactions.

Point the stock tools at the socket with XENSTORED_PATH=PATH (e.g. XENSTORED_PATH=PATH
xenstore-ls /).";

/// Xenstore daemon (Bulkhead): Xen's xenstore protocol on unix sockets.
#[derive(Parser, Debug)]
#[command(version, about, after_help = QUOTA_HELP)]
struct Args {
    /// Socket for local tools (privileged, domain 0), like /var/run/xenstored/socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Extra socket whose clients act as domain DOMID (e.g. 5:/tmp/xs-dom5): a stand-in for
    /// a domain's ring, to exercise permissions and quotas with stock tools. Repeatable.
    #[arg(long = "domain-socket", value_name = "DOMID:PATH", value_parser = parse_domain_socket)]
    domain_sockets: Vec<(u16, PathBuf)>,
    /// Set a quota, NAME=VALUE (names below). Repeatable.
    #[arg(long = "quota", value_name = "NAME=VALUE", value_parser = parse_quota)]
    quotas: Vec<(String, u32)>,
    /// A domain other than 0 that is privileged too (Xen's --priv-domid).
    #[arg(long, value_name = "DOMID")]
    priv_domid: Option<u16>,
    /// Watches per privileged connection.
    #[arg(long, default_value_t = 1024)]
    priv_watches: u32,
    /// Open transactions per privileged connection.
    #[arg(long, default_value_t = 256)]
    priv_transactions: u32,
    /// Messages queued to one client before it is dropped as too slow.
    #[arg(long, default_value_t = 4096)]
    max_queued: usize,
    /// Milliseconds a client may sit on half a message before it is dropped.
    #[arg(long, default_value_t = 5000)]
    partial_timeout_ms: u64,
    /// Log connections dropped and effects to stderr.
    #[arg(long, short)]
    verbose: bool,
}

fn parse_quota(s: &str) -> Result<(String, u32), String> {
    let (name, val) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))?;
    if !NAMES.iter().any(|(n, _)| *n == name) {
        let names: Vec<&str> = NAMES.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "unknown quota {name:?}; one of {}",
            names.join(", ")
        ));
    }
    let v: u32 = val
        .parse()
        .map_err(|_| format!("quota {name}: {val:?} is not a number in 1..=4294967295"))?;
    if v == 0 {
        return Err(format!("quota {name}: must be at least 1"));
    }
    Ok((name.to_owned(), v))
}

fn main() -> anyhow_free::Result {
    let args = Args::parse();
    let mut quotas = Quotas::default();
    for (name, v) in &args.quotas {
        quotas.set(name, *v);
    }
    let mut cfg = DaemonConfig {
        max_queued: args.max_queued.max(1),
        partial_timeout: Duration::from_millis(args.partial_timeout_ms),
        verbose: args.verbose,
        ..DaemonConfig::default()
    };
    cfg.engine.quotas = quotas;
    cfg.engine.priv_domid = args.priv_domid;
    cfg.engine.privileged.watches = args.priv_watches;
    cfg.engine.privileged.transactions = args.priv_transactions;
    let daemon = Daemon::new(cfg);
    let mut threads = Vec::new();
    let main = daemon
        .listen(&args.socket, Role::Tools)
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
    threads.push(main);
    for (d, p) in &args.domain_sockets {
        let t = daemon
            .listen(p, Role::Domain(*d))
            .map_err(|e| format!("cannot listen on {}: {e}", p.display()))?;
        threads.push(t);
    }
    eprintln!("xenstore-dom: listening on {}", args.socket.display());
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

mod anyhow_free {
    /// `main`'s result: an error message printed by the runtime.
    pub type Result = std::result::Result<(), String>;
}
