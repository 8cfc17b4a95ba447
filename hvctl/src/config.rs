//! Domain config files: TOML with xl.cfg's vocabulary, parsed into the postcard form
//! ([`DomainConfig`]) that goes to ctl-dom.
//!
//! Every key is looked up by name and type-checked here, so an error can name the field,
//! the value found and what is allowed (serde's derive would say "invalid type" without the
//! range). Unknown keys are refused: a misspelt `on_crahs` must not silently mean "default".
//! After parsing, [`DomainConfig::validate`] (the one validator ctl-dom also runs) checks
//! the ranges.
//!
//! ```toml
//! name = "web"
//! kernel = "web.elf"              # relative to the config file
//! memory = 64                     # MiB
//! maxmem = 128                    # MiB, default = memory
//! vcpus = 1
//! weight = 256
//! cap = 0                         # percent of one CPU, 0 = uncapped
//! cmdline = "console=hvc0"
//! disk = ["vol0,xvda,w", { target = "vol1", vdev = "xvdb", access = "ro" }]
//! vif = ["mac=00:16:3e:00:00:01,ip=10.0.0.2,rate=10Mb/s"]
//! on_poweroff = "destroy"         # destroy | restart | preserve
//! on_reboot = "restart"
//! on_crash = "preserve"
//! capabilities = ["remote_shutdown"]
//! ```

use std::path::{Path, PathBuf};

use shared_abi::capability::Capabilities;
use shared_abi::domain_config::{
    ConfigError, DiskAccess, DiskSpec, DomainConfig, LifecycleAction, VifSpec,
};
use toml::Value;

/// Keys a config may have.
pub const KEYS: &[&str] = &[
    "name",
    "kernel",
    "memory",
    "maxmem",
    "vcpus",
    "weight",
    "cap",
    "cmdline",
    "disk",
    "vif",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "capabilities",
];

/// Largest kernel image hvctl will send (the frame must hold it).
pub const MAX_KERNEL_BYTES: u64 = (shared_abi::mgmt::MAX_PAYLOAD - 64 * 1024) as u64;

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {error}")]
    Field { path: PathBuf, error: ConfigError },
}

/// A parsed config and the kernel it names.
#[derive(Debug)]
pub struct LoadedConfig {
    pub config: DomainConfig,
    pub kernel_path: PathBuf,
    pub kernel: Vec<u8>,
}

/// Read, parse and validate a config file, then read its kernel.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let field = |error| ConfigFileError::Field {
        path: path.to_path_buf(),
        error,
    };
    let (config, kernel_rel) = parse(&text).map_err(|e| match e {
        ParseError::Syntax(message) => ConfigFileError::Syntax {
            path: path.to_path_buf(),
            message,
        },
        ParseError::Field(e) => field(e),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let kernel_path = base.join(&kernel_rel);
    let kernel = read_kernel(&kernel_path).map_err(field)?;
    Ok(LoadedConfig {
        config,
        kernel_path,
        kernel,
    })
}

fn read_kernel(p: &Path) -> Result<Vec<u8>, ConfigError> {
    let shown = p.display().to_string();
    let meta = std::fs::metadata(p)
        .map_err(|e| ConfigError::new("kernel", &shown, format!("a readable ELF file ({e})")))?;
    if !meta.is_file() || meta.len() > MAX_KERNEL_BYTES {
        return Err(ConfigError::new(
            "kernel",
            format!("{shown} ({} bytes)", meta.len()),
            format!("a regular file of at most {MAX_KERNEL_BYTES} bytes"),
        ));
    }
    let bytes = std::fs::read(p)
        .map_err(|e| ConfigError::new("kernel", &shown, format!("a readable ELF file ({e})")))?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(ConfigError::new(
            "kernel",
            &shown,
            "an ELF file (starts with 0x7f 'E' 'L' 'F')",
        ));
    }
    Ok(bytes)
}

/// Why text did not parse.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    Syntax(String),
    Field(ConfigError),
}

impl From<ConfigError> for ParseError {
    fn from(e: ConfigError) -> Self {
        ParseError::Field(e)
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Syntax(m) => write!(f, "not valid TOML: {m}"),
            ParseError::Field(e) => write!(f, "{e}"),
        }
    }
}

fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}...", s.chars().take(77).collect::<String>())
    } else {
        s
    }
}

fn string(v: &Value, field: &str, allowed: &str) -> Result<String, ConfigError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| ConfigError::new(field, shown(v), allowed))
}

fn uint(v: &Value, field: &str, max: u64, unit: &str) -> Result<u64, ConfigError> {
    v.as_integer()
        .and_then(|i| u64::try_from(i).ok())
        .filter(|&i| i <= max)
        .ok_or_else(|| ConfigError::new(field, shown(v), format!("an integer 0..={max}{unit}")))
}

fn action(v: &Value, field: &str) -> Result<LifecycleAction, ConfigError> {
    v.as_str()
        .and_then(LifecycleAction::from_name)
        .ok_or_else(|| {
            ConfigError::new(field, shown(v), "\"destroy\", \"restart\" or \"preserve\"")
        })
}

/// Parse config text into a validated [`DomainConfig`] and the kernel path it names.
pub fn parse(text: &str) -> Result<(DomainConfig, String), ParseError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ParseError::Syntax(e.message().to_string() + &span_hint(text, e.span()))
    })?;
    if let Some(k) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(ConfigError::new(k.as_str(), "(unknown key)", KEYS.join(", ")).into());
    }
    let get = |k: &str| table.get(k);
    let name = match get("name") {
        Some(v) => string(v, "name", "a string")?,
        None => return Err(ConfigError::new("name", "(missing)", "a domain name").into()),
    };
    let kernel = match get("kernel") {
        Some(v) => string(v, "kernel", "a path to an ELF file")?,
        None => {
            return Err(ConfigError::new("kernel", "(missing)", "a path to an ELF file").into());
        }
    };
    const MAX_MIB: u64 = shared_abi::manifest::MAX_MEMORY_KIB / 1024;
    let memory_mib = match get("memory") {
        Some(v) => uint(v, "memory", MAX_MIB, " MiB")?,
        None => return Err(ConfigError::new("memory", "(missing)", "memory in MiB").into()),
    };
    let mut c = DomainConfig::new(&name, memory_mib * 1024);
    if let Some(v) = get("maxmem") {
        c.maxmem_kib = uint(v, "maxmem", MAX_MIB, " MiB")? * 1024;
    }
    if let Some(v) = get("vcpus") {
        c.vcpus = uint(v, "vcpus", u32::MAX.into(), "")? as u32;
    }
    if let Some(v) = get("weight") {
        c.weight = uint(v, "weight", u32::MAX.into(), "")? as u32;
    }
    if let Some(v) = get("cap") {
        c.cap_percent = uint(v, "cap", u32::MAX.into(), " percent")? as u32;
    }
    if let Some(v) = get("cmdline") {
        c.cmdline = string(v, "cmdline", "a string")?;
    }
    if let Some(v) = get("on_poweroff") {
        c.on_poweroff = action(v, "on_poweroff")?;
    }
    if let Some(v) = get("on_reboot") {
        c.on_reboot = action(v, "on_reboot")?;
    }
    if let Some(v) = get("on_crash") {
        c.on_crash = action(v, "on_crash")?;
    }
    if let Some(v) = get("capabilities") {
        c.capabilities = capabilities(v)?;
    }
    if let Some(v) = get("disk") {
        let list = v
            .as_array()
            .ok_or_else(|| ConfigError::new("disk", shown(v), "an array of disk specs"))?;
        for (i, d) in list.iter().enumerate() {
            c.disks.push(disk(d, &format!("disk[{i}]"))?);
        }
    }
    if let Some(v) = get("vif") {
        let list = v
            .as_array()
            .ok_or_else(|| ConfigError::new("vif", shown(v), "an array of vif specs"))?;
        for (i, d) in list.iter().enumerate() {
            c.vifs.push(vif(d, &format!("vif[{i}]"))?);
        }
    }
    c.validate()?;
    Ok((c, kernel))
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

fn capabilities(v: &Value) -> Result<Capabilities, ConfigError> {
    let names: Vec<&str> = Capabilities::NAMES.iter().map(|(n, _)| *n).collect();
    let allowed = format!("an array of: {}", names.join(", "));
    let list = v
        .as_array()
        .ok_or_else(|| ConfigError::new("capabilities", shown(v), &allowed))?;
    let mut caps = Capabilities::empty();
    for (i, item) in list.iter().enumerate() {
        let c = item
            .as_str()
            .and_then(Capabilities::from_config_name)
            .ok_or_else(|| ConfigError::new(format!("capabilities[{i}]"), shown(item), &allowed))?;
        caps |= c;
    }
    Ok(caps)
}

fn access(s: &str, field: &str) -> Result<DiskAccess, ConfigError> {
    match s {
        "r" | "ro" => Ok(DiskAccess::ReadOnly),
        "w" | "rw" => Ok(DiskAccess::ReadWrite),
        _ => Err(ConfigError::new(
            field,
            format!("{s:?}"),
            "\"r\"/\"ro\" or \"w\"/\"rw\"",
        )),
    }
}

/// Split `k=v,k=v` into pairs; `None` for an item without `=`.
fn pairs(s: &str) -> Vec<(&str, Option<&str>)> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (p, None),
        })
        .collect()
}

/// A disk spec: a table `{target, vdev, access, backend}`, xl's positional string
/// `"target,vdev,access"`, or key=value `"target=..,vdev=..,access=..,backend=.."`.
pub fn disk(v: &Value, field: &str) -> Result<DiskSpec, ConfigError> {
    let mut d = DiskSpec {
        target: String::new(),
        vdev: String::new(),
        access: DiskAccess::ReadWrite,
        backend: None,
    };
    const KEYS: &str = "target, vdev, access, backend";
    match v {
        Value::String(s) => {
            let ps = pairs(s);
            if ps.iter().all(|(_, v)| v.is_none()) {
                // Positional, as xl writes it.
                let pos: Vec<&str> = ps.iter().map(|(k, _)| *k).collect();
                if !(2..=3).contains(&pos.len()) {
                    return Err(ConfigError::new(
                        field,
                        format!("{s:?}"),
                        "\"target,vdev[,access]\" or key=value pairs (target, vdev, access, backend)",
                    ));
                }
                d.target = pos[0].to_string();
                d.vdev = pos[1].to_string();
                if let Some(a) = pos.get(2) {
                    d.access = access(a, &format!("{field}.access"))?;
                }
            } else {
                for (k, val) in ps {
                    let f = format!("{field}.{k}");
                    let val = val.ok_or_else(|| ConfigError::new(&f, "(no value)", "key=value"))?;
                    match k {
                        "target" => d.target = val.to_string(),
                        "vdev" => d.vdev = val.to_string(),
                        "access" => d.access = access(val, &f)?,
                        "backend" => d.backend = Some(val.to_string()),
                        _ => return Err(ConfigError::new(&f, "(unknown key)", KEYS)),
                    }
                }
            }
        }
        Value::Table(t) => {
            for (k, val) in t {
                let f = format!("{field}.{k}");
                let s = string(val, &f, "a string")?;
                match k.as_str() {
                    "target" => d.target = s,
                    "vdev" => d.vdev = s,
                    "access" => d.access = access(&s, &f)?,
                    "backend" => d.backend = Some(s),
                    _ => return Err(ConfigError::new(&f, "(unknown key)", KEYS)),
                }
            }
        }
        _ => {
            return Err(ConfigError::new(field, shown(v), "a string or a table"));
        }
    }
    Ok(d)
}

/// A MAC address `aa:bb:cc:dd:ee:ff`.
pub fn mac(s: &str, field: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::new(field, format!("{s:?}"), "six hex octets, aa:bb:cc:dd:ee:ff");
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut m = [0u8; 6];
    for (o, p) in m.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(m)
}

/// An IPv4 address.
pub fn ip(s: &str, field: &str) -> Result<[u8; 4], ConfigError> {
    s.parse::<std::net::Ipv4Addr>()
        .map(|a| a.octets())
        .map_err(|_| ConfigError::new(field, format!("{s:?}"), "a dotted IPv4 address"))
}

/// xl's rate syntax: `<n><unit>/s` with unit B, KB, MB, GB (bytes) or b, Kb, Mb, Gb (bits),
/// decimal multiples; answered in bytes per second.
pub fn rate(s: &str, field: &str) -> Result<u64, ConfigError> {
    let bad = || {
        ConfigError::new(
            field,
            format!("{s:?}"),
            "<number><unit>/s with unit B, KB, MB, GB, b, Kb, Mb or Gb (e.g. 10Mb/s)",
        )
    };
    let body = s.strip_suffix("/s").ok_or_else(bad)?;
    let digits = body.bytes().take_while(u8::is_ascii_digit).count();
    let n: u64 = body[..digits].parse().map_err(|_| bad())?;
    let (mult, bits) = match &body[digits..] {
        "B" => (1, false),
        "KB" => (1_000, false),
        "MB" => (1_000_000, false),
        "GB" => (1_000_000_000, false),
        "b" => (1, true),
        "Kb" => (1_000, true),
        "Mb" => (1_000_000, true),
        "Gb" => (1_000_000_000, true),
        _ => return Err(bad()),
    };
    let v = n.checked_mul(mult).ok_or_else(bad)?;
    Ok(if bits { v / 8 } else { v })
}

/// A vif spec: a table `{mac, ip, rate, backend}` or xl's `"mac=..,ip=..,rate=..,backend=.."`.
pub fn vif(v: &Value, field: &str) -> Result<VifSpec, ConfigError> {
    let mut out = VifSpec {
        mac: None,
        ip: None,
        rate_bytes_per_sec: None,
        backend: None,
    };
    let kv: Vec<(String, String)> = match v {
        Value::String(s) => pairs(s)
            .into_iter()
            .map(|(k, val)| {
                val.map(|x| (k.to_string(), x.to_string())).ok_or_else(|| {
                    ConfigError::new(format!("{field}.{k}"), "(no value)", "key=value")
                })
            })
            .collect::<Result<_, _>>()?,
        Value::Table(t) => t
            .iter()
            .map(|(k, val)| Ok((k.clone(), string(val, &format!("{field}.{k}"), "a string")?)))
            .collect::<Result<_, ConfigError>>()?,
        _ => return Err(ConfigError::new(field, shown(v), "a string or a table")),
    };
    for (k, val) in kv {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "mac" => out.mac = Some(mac(&val, &f)?),
            "ip" => out.ip = Some(ip(&val, &f)?),
            "rate" => out.rate_bytes_per_sec = Some(rate(&val, &f)?),
            "backend" => out.backend = Some(val),
            _ => {
                return Err(ConfigError::new(
                    &f,
                    "(unknown key)",
                    "mac, ip, rate, backend",
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "web"
kernel = "web.elf"
memory = 64
maxmem = 128
vcpus = 2
weight = 512
cap = 150
cmdline = "quiet"
disk = ["vol0,xvda,w", { target = "vol1", vdev = "xvdb", access = "ro", backend = "blk" }]
vif = ["mac=00:16:3e:00:00:01,ip=10.0.0.2,rate=10Mb/s", { mac = "00:16:3e:00:00:02" }]
on_crash = "preserve"
capabilities = ["remote_shutdown"]
"#;

    fn field_err(text: &str) -> ConfigError {
        match parse(text) {
            Err(ParseError::Field(e)) => e,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    fn with(line: &str) -> String {
        format!("name = \"g\"\nkernel = \"k\"\nmemory = 16\n{line}\n")
    }

    #[test]
    fn full_config_parses_with_xl_vocabulary() {
        let (c, kernel) = parse(GOOD).unwrap();
        assert_eq!(kernel, "web.elf");
        assert_eq!(c.name, "web");
        assert_eq!(c.memory_kib, 64 * 1024);
        assert_eq!(c.maxmem_kib, 128 * 1024);
        assert_eq!((c.vcpus, c.weight, c.cap_percent), (2, 512, 150));
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[1].access, DiskAccess::ReadOnly);
        assert_eq!(c.disks[1].backend.as_deref(), Some("blk"));
        assert_eq!(c.vifs[0].mac, Some([0, 0x16, 0x3e, 0, 0, 1]));
        assert_eq!(c.vifs[0].ip, Some([10, 0, 0, 2]));
        assert_eq!(c.vifs[0].rate_bytes_per_sec, Some(1_250_000));
        assert_eq!(c.on_crash, LifecycleAction::Preserve);
        assert_eq!(c.on_reboot, LifecycleAction::Restart, "xl's default");
        assert_eq!(c.capabilities, Capabilities::REMOTE_SHUTDOWN);
    }

    #[test]
    fn each_bad_field_is_named_with_value_and_allowed() {
        let cases = [
            ("vcpus = 0", "vcpus", "0", "1..=32"),
            ("vcpus = -1", "vcpus", "-1", "integer"),
            ("memory2 = 1", "memory2", "unknown", "memory"),
            ("on_crash = \"reboot\"", "on_crash", "reboot", "preserve"),
            ("weight = \"heavy\"", "weight", "heavy", "integer"),
            ("cap = 101", "cap", "101", "0..=100"),
            ("maxmem = 8", "maxmem", "8192", "16384.."),
            (
                "capabilities = [\"root\"]",
                "capabilities[0]",
                "root",
                "grant_map",
            ),
            ("disk = [\"vol0\"]", "disk[0]", "vol0", "target,vdev"),
            ("disk = [\"vol0,sda\"]", "disk[0].vdev", "sda", "xvd"),
            ("disk = [\"vol0,xvda,x\"]", "disk[0].access", "x", "ro"),
            (
                "disk = [{ size = \"1\" }]",
                "disk[0].size",
                "unknown",
                "target",
            ),
            (
                "vif = [\"mac=00:16:3e:00:00\"]",
                "vif[0].mac",
                "00:16:3e:00:00",
                "six hex",
            ),
            ("vif = [\"ip=10.0.0\"]", "vif[0].ip", "10.0.0", "IPv4"),
            ("vif = [\"rate=10Mbps\"]", "vif[0].rate", "10Mbps", "Mb"),
            (
                "vif = [\"bridge=xenbr0\"]",
                "vif[0].bridge",
                "unknown",
                "mac, ip",
            ),
            ("vif = \"mac=00:16:3e:00:00:01\"", "vif", "mac=", "array"),
        ];
        for (line, field, value, allowed) in cases {
            let e = field_err(&with(line));
            assert_eq!(e.field, field, "{line}");
            assert!(e.value.contains(value), "{line}: value {:?}", e.value);
            assert!(
                e.allowed.contains(allowed),
                "{line}: allowed {:?}",
                e.allowed
            );
        }
    }

    #[test]
    fn missing_required_fields_are_named() {
        assert_eq!(field_err("kernel = \"k\"\nmemory = 16").field, "name");
        assert_eq!(field_err("name = \"g\"\nmemory = 16").field, "kernel");
        assert_eq!(field_err("name = \"g\"\nkernel = \"k\"").field, "memory");
    }

    #[test]
    fn toml_syntax_error_reports_the_line() {
        match parse("name = \"g\"\nmemory = = 3\n") {
            Err(ParseError::Syntax(m)) => assert!(m.contains("line 2"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rate_units_are_bits_or_bytes() {
        assert_eq!(rate("8b/s", "r"), Ok(1));
        assert_eq!(rate("1KB/s", "r"), Ok(1000));
        assert_eq!(rate("1Gb/s", "r"), Ok(125_000_000));
        assert!(rate("99999999999999999999GB/s", "r").is_err());
        assert!(rate("/s", "r").is_err());
    }

    #[test]
    fn load_refuses_a_kernel_that_is_not_elf() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"not an elf").unwrap();
        let cfg = dir.path().join("g.toml");
        std::fs::write(&cfg, with("")).unwrap();
        let e = load(&cfg).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("kernel") && msg.contains("ELF"), "{msg}");
    }

    #[test]
    fn load_reads_kernel_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"\x7fELF....").unwrap();
        let cfg = dir.path().join("g.toml");
        std::fs::write(&cfg, with("")).unwrap();
        let l = load(&cfg).unwrap();
        assert_eq!(l.kernel, b"\x7fELF....");
        assert_eq!(l.config.name, "g");
    }

    #[test]
    fn load_of_a_missing_file_names_the_path() {
        let e = load(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.toml"));
    }
}
