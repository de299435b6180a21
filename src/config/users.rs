//! Users and groups, resolved through the C library's name service switch (NSS:
//! `getpwnam_r`, `getgrnam_r`, `getgrouplist`), so users from LDAP or systemd's dynamic
//! users resolve as they do for `id(1)`. A name that is all digits and names no user is
//! taken as a number.

use crate::sys::users as nss;

/// A user's entry.
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

impl From<nss::Passwd> for UserEntry {
    fn from(p: nss::Passwd) -> Self {
        UserEntry {
            name: p.name,
            uid: p.uid,
            gid: p.gid,
            home: p.home,
            shell: p.shell,
        }
    }
}

/// Looks a user up by name, or by numeric uid. A lookup that fails (an NSS module that
/// cannot be reached) finds nothing.
pub fn lookup_user(name: &str) -> Option<UserEntry> {
    if let Ok(Some(p)) = nss::user_by_name(name) {
        return Some(p.into());
    }
    let uid = name.parse::<u32>().ok()?;
    nss::user_by_uid(uid).ok().flatten().map(UserEntry::from)
}

/// Looks a group up by name, or takes a numeric gid as it is.
pub fn lookup_group(name: &str) -> Option<u32> {
    match nss::group_by_name(name) {
        Ok(Some(gid)) => Some(gid),
        _ => name.parse().ok(),
    }
}

/// The groups `user` (with primary group `gid`) belongs to, as a login would set them;
/// just `gid` when they cannot be listed.
pub fn user_groups(user: &str, gid: u32) -> Vec<u32> {
    nss::group_list(user, gid).unwrap_or_else(|_| vec![gid])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_or_number() {
        assert_eq!(lookup_user("root").map(|u| u.uid), Some(0));
        assert_eq!(lookup_user("0").map(|u| u.name), Some("root".into()));
        assert_eq!(lookup_user("no-such-user-hopefully"), None);
        assert_eq!(lookup_group("root"), Some(0));
        assert_eq!(lookup_group("4242"), Some(4242));
        assert_eq!(lookup_group("no-such-group-hopefully"), None);
        assert!(user_groups("root", 0).contains(&0));
    }
}
