//! `user = "NAME"`: started as root, the supervisor binds what takes root
//! (the listeners, the metrics endpoint, the stats file), then becomes NAME
//! (its uid, its primary group, its supplementary groups) before it starts
//! a worker, as nginx's master does for its workers; here the supervisor
//! too, so no udpshard process keeps uid 0.
//!
//! It keeps three capabilities, in its ambient set so that every process it
//! starts (its workers, a binary upgrade's new generation) has them too:
//! CAP_NET_BIND_SERVICE (a reload's new listeners on low ports),
//! CAP_NET_RAW (the workers' raw sockets, only with `upstream_send =
//! "auto"`) and CAP_SETPCAP (so that a worker may empty its bounding set).
//! A worker drops all three once it is set up. It is what the packaged
//! unit's `User=` with `AmbientCapabilities=` gives.

use std::ffi::CString;
use std::io;

use nix::unistd::{Gid, Uid, User};

use super::{bit, drop_bounding, permitted, prctl, set_caps, NET_BIND_SERVICE, NET_RAW, SETPCAP};

/// The identity the proxy runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// This process changed to it (it was started as root); otherwise it
    /// was started as that user.
    pub changed: bool,
    /// The capabilities its workers start with, by name.
    pub kept: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user = {name:?}: no such user on this host")]
    Unknown { name: String },
    #[error("user = {name:?}: cannot look it up: {source}")]
    Lookup { name: String, source: nix::Error },
    #[error(
        "user = {name:?} (uid {uid}): udpshard runs as uid {current}, and only root may \
         change to another user: start it as root{}, or remove the key",
        if name == "root" { String::new() } else { format!(" or as {name}") }
    )]
    NotRoot {
        name: String,
        uid: u32,
        current: u32,
    },
    #[error("user = {name:?}: cannot change to it: {step}: {source}")]
    Change {
        name: String,
        step: &'static str,
        source: io::Error,
    },
}

/// The capabilities kept across the change, with their names.
const KEPT: [(u32, &str); 3] = [
    (NET_BIND_SERVICE, "CAP_NET_BIND_SERVICE"),
    (NET_RAW, "CAP_NET_RAW"),
    (SETPCAP, "CAP_SETPCAP"),
];

/// Looks `name` up in the host's user database.
pub fn lookup_user(name: &str) -> Result<User, UserError> {
    match User::from_name(name) {
        Ok(Some(user)) => Ok(user),
        Ok(None) => Err(UserError::Unknown {
            name: name.to_string(),
        }),
        Err(source) => Err(UserError::Lookup {
            name: name.to_string(),
            source,
        }),
    }
}

/// Whether this process may run as `name`: it exists (returned), and this
/// process is root or already runs as it. The supervisor asks before it
/// binds or creates anything.
pub fn check_user(name: &str) -> Result<User, UserError> {
    let user = lookup_user(name)?;
    let euid = Uid::effective();
    if euid.is_root() || (euid == user.uid && Uid::current() == user.uid) {
        return Ok(user);
    }
    Err(UserError::NotRoot {
        name: name.to_string(),
        uid: user.uid.as_raw(),
        current: euid.as_raw(),
    })
}

/// Runs this process as `name` from here on (see the module's text).
/// `raw`: keep CAP_NET_RAW for the workers' raw sockets. Started as that
/// user already, it changes nothing; started as another user but root, it
/// refuses. An error in the middle of the change leaves the process
/// between the two: the caller must exit.
pub fn become_user(name: &str, raw: bool) -> Result<RunAs, UserError> {
    let user = check_user(name)?;
    let mut run_as = RunAs {
        name: name.to_string(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        changed: false,
        kept: Vec::new(),
    };
    if Uid::effective() == user.uid && Uid::current() == user.uid {
        return Ok(run_as);
    }
    let change = |step: &'static str| {
        move |source: io::Error| UserError::Change {
            name: name.to_string(),
            step,
            source,
        }
    };
    let keep = KEPT
        .iter()
        .filter(|&&(cap, _)| raw || cap != NET_RAW)
        .fold(0, |set, &(cap, _)| set | bit(cap));
    // Root holds every capability; what a container withheld stays out.
    let keep = keep & permitted().map_err(change("capget"))?;
    prctl(libc::PR_SET_KEEPCAPS, 1, 0).map_err(change("PR_SET_KEEPCAPS"))?;
    // Nothing outside `keep` can come back, whatever this process or its
    // children execute.
    drop_bounding(keep);
    let c_name = CString::new(name).map_err(|_| UserError::Unknown {
        name: name.to_string(),
    })?;
    nix::unistd::initgroups(&c_name, user.gid)
        .map_err(io::Error::from)
        .map_err(change("initgroups"))?;
    nix::unistd::setresgid(user.gid, user.gid, user.gid)
        .map_err(io::Error::from)
        .map_err(change("setresgid"))?;
    nix::unistd::setresuid(user.uid, user.uid, user.uid)
        .map_err(io::Error::from)
        .map_err(change("setresuid"))?;
    // PR_SET_KEEPCAPS kept the permitted set; the effective one is empty.
    // The supervisor itself uses only CAP_NET_BIND_SERVICE (a reload's new
    // listeners); the others are for its children, through the ambient set
    // (which takes them permitted and inheritable, not effective).
    set_caps(keep & bit(NET_BIND_SERVICE), keep, keep).map_err(change("capset"))?;
    for &(cap, cap_name) in &KEPT {
        if keep & bit(cap) != 0 {
            prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE as u32, cap)
                .map_err(change("PR_CAP_AMBIENT_RAISE"))?;
            run_as.kept.push(cap_name);
        }
    }
    prctl(libc::PR_SET_KEEPCAPS, 0, 0).map_err(change("PR_SET_KEEPCAPS"))?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map_err(change("PR_SET_NO_NEW_PRIVS"))?;
    // No way back: without CAP_SETUID and CAP_SETGID, these must fail (the
    // group's only where it is not root's own).
    let root_gid = Gid::from_raw(0);
    if nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).is_ok()
        || (user.gid != root_gid && nix::unistd::setresgid(root_gid, root_gid, root_gid).is_ok())
    {
        return Err(UserError::Change {
            name: name.to_string(),
            step: "checking that root cannot come back",
            source: io::Error::other("setresuid(0) or setresgid(0) succeeded"),
        });
    }
    run_as.changed = true;
    Ok(run_as)
}
