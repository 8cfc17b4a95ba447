//! The policy module: every privileged operation asks here, never compiled out.
