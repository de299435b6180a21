//! Users and groups, resolved from `/etc/passwd` and `/etc/group` (NSS modules such as
//! LDAP are not consulted).

/// A user entry from `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    /// Login name.
    pub name: String,
    /// uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Home directory.
    pub home: String,
    /// Login shell.
    pub shell: String,
}

/// Looks a user up by name or numeric uid in `/etc/passwd`.
pub fn lookup_user(name: &str) -> Option<UserEntry> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    let entries = text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7).then(|| UserEntry {
            name: f[0].to_string(),
            uid: f[2].parse().unwrap_or(u32::MAX),
            gid: f[3].parse().unwrap_or(u32::MAX),
            home: f[5].to_string(),
            shell: f[6].to_string(),
        })
    });
    let mut by_uid = None;
    for e in entries {
        if e.name == name {
            return Some(e);
        }
        if name.parse::<u32>().ok() == Some(e.uid) {
            by_uid = Some(e);
        }
    }
    by_uid
}

/// Looks a group up by name or numeric gid in `/etc/group`.
pub fn lookup_group(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 3 && f[0] == name {
            return f[2].parse().ok();
        }
    }
    name.parse().ok()
}
