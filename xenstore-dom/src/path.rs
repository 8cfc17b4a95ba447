//! Node paths: canonical form, Xen's character and length rules, parent/child relations.
//!
//! A canonical path is either absolute (`/`, `/a/b`: no `//`, no trailing `/`) or a special
//! watch name starting with `@`. Relative input is taken under the connection's home
//! (`/local/domain/<id>`). Only ASCII alphanumerics and `-/_@` are allowed.

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;

use shared_abi::errno::XenError;
use shared_abi::xenstore::ABS_PATH_MAX;

/// Home of a domain's relative paths (`get_implicit_path`).
pub fn domain_path(domid: u32) -> String {
    format!("/local/domain/{domid}")
}

fn valid_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'@'))
}

/// Length of a leading `/local/domain/<1-5 digits>/`, which does not count against the
/// relative path limit (Xen's `local_off`).
fn local_offset(name: &str) -> usize {
    const PFX: &str = "/local/domain/";
    let Some(rest) = name.strip_prefix(PFX) else {
        return 0;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if (1..=5).contains(&digits) && rest.as_bytes().get(digits) == Some(&b'/') {
        PFX.len() + digits + 1
    } else {
        0
    }
}

/// A canonicalised path and whether the input was relative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Canonical {
    pub path: String,
    pub relative: bool,
}

/// Canonicalise `input` for a connection whose home is `home`. `path_max` is the relative
/// length limit to enforce (`None` for privileged connections). Errors are `EINVAL`, as Xen.
pub fn canonicalize(
    input: &[u8],
    home: &str,
    allow_special: bool,
    path_max: Option<usize>,
) -> Result<Canonical, XenError> {
    let s = core::str::from_utf8(input).map_err(|_| XenError::EINVAL)?;
    if !valid_chars(s) || (s.starts_with('@') && !allow_special) {
        return Err(XenError::EINVAL);
    }
    let relative = !s.starts_with('/') && !s.starts_with('@');
    let name = if relative {
        format!("{home}/{s}")
    } else {
        s.to_owned()
    };
    let bad_end = name.ends_with('/') && name != "/";
    let too_long = name.len() > ABS_PATH_MAX
        || path_max.is_some_and(|max| name.len() - local_offset(&name) > max);
    if bad_end || name.contains("//") || too_long {
        return Err(XenError::EINVAL);
    }
    Ok(Canonical {
        path: name,
        relative,
    })
}

/// Parent of a canonical path (`/` for top-level names and for special names).
pub fn parent(path: &str) -> &str {
    match path.get(1..).and_then(|p| p.rfind('/')) {
        Some(i) => &path[..i + 1],
        None => "/",
    }
}

/// Last component of a canonical absolute path other than `/`.
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Path of child `name` under `dir`.
pub fn child(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// Is `path` equal to `watch` or below it? (`/` covers every absolute path.)
pub fn is_child(path: &str, watch: &str) -> bool {
    if watch == "/" {
        return path.starts_with('/');
    }
    path.strip_prefix(watch)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> Result<String, XenError> {
        canonicalize(s.as_bytes(), "/local/domain/5", false, Some(20)).map(|c| c.path)
    }

    #[test]
    fn relative_paths_go_under_the_domain_home() {
        assert_eq!(canon("device/vbd").unwrap(), "/local/domain/5/device/vbd");
        assert!(
            canonicalize(b"x", "/local/domain/5", false, None)
                .unwrap()
                .relative
        );
    }

    #[test]
    fn malformed_paths_are_einval() {
        for bad in ["", "/a/", "/a//b", "/a b", "/a.b", "@x", "/\u{e9}"] {
            assert_eq!(canon(bad), Err(XenError::EINVAL), "{bad:?}");
        }
        assert_eq!(canon("/"), Ok("/".into()));
        assert!(canonicalize(b"@releaseDomain", "/", true, None).is_ok());
    }

    #[test]
    fn relative_limit_skips_the_local_domain_prefix() {
        let long = "a".repeat(20);
        assert!(canon(&format!("/local/domain/7/{long}")).is_ok());
        assert!(canon(&format!("/local/domain/7/{long}b")).is_err());
        assert!(canon(&format!("/x{long}")).is_err());
        let huge = format!("/{}", "a".repeat(ABS_PATH_MAX));
        assert!(canonicalize(huge.as_bytes(), "/", false, None).is_err());
    }

    #[test]
    fn parent_child_and_is_child() {
        assert_eq!(parent("/a/b"), "/a");
        assert_eq!(parent("/a"), "/");
        assert_eq!(parent("@releaseDomain"), "/");
        assert_eq!(basename("/a/b"), "b");
        assert_eq!(child("/", "a"), "/a");
        assert!(is_child("/a/b", "/a"));
        assert!(is_child("/a", "/a"));
        assert!(!is_child("/ab", "/a"));
        assert!(is_child("/x", "/"));
        assert!(!is_child("@introduceDomain", "/"));
    }
}
