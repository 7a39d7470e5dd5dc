//! Who owns a pool on RBD: the exclusive lock of its images, taken explicitly (librbd's
//! managed lock: no automatic hand-over to another client that asks for it), and taken over
//! from a lost owner by breaking it, which blocklists the old owner's client in the cluster.
//!
//! Any recorded owner refuses the pool, even one whose daemon died: only an operator (or the
//! manager above thinblk) knows that the other host is gone or may be fenced, so taking over
//! is asked for (`--take-over`), never inferred from a timeout.

use std::io;

use log::warn;

use super::cluster::Cluster;
use super::error::errno;
use super::image::RbdImage;

/// Why an image's lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error(
        "rbd:{image} is owned by {}; another daemon serves this pool \
         (start with --take-over to fence it and take the pool over)",
        .owners.join(", ")
    )]
    Held { image: String, owners: Vec<String> },
    #[error("rbd:{image}: {what}")]
    Rbd {
        image: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What [`claim`] did to get the lock.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Claimed {
    /// The owners whose lock was broken (and whose clients the cluster now refuses).
    pub fenced: Vec<String>,
}

/// The lock's current owners (client addresses); none when the image is not locked.
pub fn owners(image: &RbdImage, name: &str) -> Result<Vec<String>, OwnershipError> {
    match image.lock_owners() {
        Ok(owners) => Ok(owners.into_iter().map(|o| o.owner).collect()),
        Err(source) => Err(OwnershipError::Rbd {
            image: name.to_string(),
            what: "reading the lock's owners",
            source,
        }),
    }
}

/// Whether `e` says the cluster refuses this client: another owner broke its lock (and
/// blocklisted it).
pub fn is_fenced(e: &io::Error) -> bool {
    errno(e) == Some(libc::ESHUTDOWN)
}

/// Takes the exclusive lock of `image` (named `name` in messages), an image of `cluster`. A
/// lock some other client holds refuses the claim, unless `take_over`: then each owner's
/// client is blocklisted, and this waits until the cluster's newest OSD map (which every
/// request of ours then carries) has the entry, before the lock is broken and taken. So
/// nothing the old owner still sends can land after this returns, whatever librbd's own
/// `rbd_blocklist_on_break_lock` says.
pub fn claim(
    cluster: &Cluster,
    image: &RbdImage,
    name: &str,
    take_over: bool,
) -> Result<Claimed, OwnershipError> {
    let rbd_err = |what: &'static str| {
        move |source: io::Error| OwnershipError::Rbd {
            image: name.to_string(),
            what,
            source,
        }
    };
    let held = owners(image, name)?;
    let mut claimed = Claimed::default();
    if !held.is_empty() {
        if !take_over {
            return Err(OwnershipError::Held {
                image: name.to_string(),
                owners: held,
            });
        }
        for owner in held {
            warn!("rbd:{name}: fencing {owner}: blocklisting its client, breaking its lock");
            cluster
                .blocklist_add(&owner, 0)
                .map_err(rbd_err("blocklisting the owner"))?;
            match image.lock_break(&owner) {
                Ok(()) => {}
                // Released (or broken by someone else) since we read it: nothing to fence.
                Err(e) if errno(&e) == Some(libc::ENOENT) => continue,
                Err(e) => return Err(rbd_err("breaking the lock")(e)),
            }
            claimed.fenced.push(owner);
        }
    }
    if let Err(source) = image.lock_acquire() {
        // Another daemon won a race for a lock that was free (or just broken): name it.
        let now = owners(image, name).unwrap_or_default();
        if !now.is_empty() {
            return Err(OwnershipError::Held {
                image: name.to_string(),
                owners: now,
            });
        }
        return Err(rbd_err("taking the exclusive lock")(source));
    }
    Ok(claimed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_owner_and_the_way_to_take_over() {
        let e = OwnershipError::Held {
            image: "thinblk/meta".into(),
            owners: vec!["127.0.0.1:0/3291734543".into()],
        };
        let text = e.to_string();
        assert!(text.contains("rbd:thinblk/meta"), "{text}");
        assert!(
            text.contains("is owned by 127.0.0.1:0/3291734543"),
            "{text}"
        );
        assert!(text.contains("--take-over"), "{text}");
    }
}
