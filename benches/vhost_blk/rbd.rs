//! `--sections rbd`: thinblk's raw `rbd=` export against qemu-storage-daemon's `rbd` driver
//! (QEMU's librbd block driver, from qemu-block-extra), one image of a Ceph cluster, the two
//! servers in turn. The cluster is `THINBLK_CEPH_CONF`'s (scripts/ceph-cluster.sh makes one);
//! thinblk must be built with the `rbd` feature (`cargo bench --features rbd ...`). Both use
//! librbd's default cache, as both leave it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::client::Client;
use crate::server::Server;
use crate::stats::{cost, ratio, show};
use crate::suite::{alternate, Settings};

const POOL: &str = "thinblk";
/// Written whole once, so reads find objects (an unwritten RBD object reads as zeros without
/// reaching an OSD's disk).
const IMAGE_SIZE: u64 = 1 << 30;

fn rbd_cli(conf: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .map_err(|e| format!("rbd: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rbd {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A new image, written whole through a thinblk export.
fn prepare(s: &Settings, conf: &Path, image: &str) -> Result<(), String> {
    let spec = format!("{POOL}/{image}");
    rbd_cli(
        conf,
        &["create", "--size", &format!("{}M", IMAGE_SIZE >> 20), &spec],
    )?;
    let sock = s.dir.join("rbd-fill.sock");
    let server = Server::thinblk(&format!("rbd={spec}"), &sock, &s.dir)?;
    let mut c = Client::connect(&sock, 8 << 20)?;
    eprintln!("  writing image {spec} ({} MiB)", IMAGE_SIZE >> 20);
    c.fill(IMAGE_SIZE, 1 << 20, 8)
        .map_err(|e| format!("{e} ({})", server.log_tail()))
}

pub fn section(s: &Settings, out: &mut String) {
    out.push_str(
        "### Ceph RBD image (one-node cluster on this machine), one queue\n\n\
         | job | thinblk rbd= | qsd rbd | thinblk/qsd | thinblk cost | qsd cost |\n\
         |---|---|---|---|---|---|\n",
    );
    let Some(conf) = std::env::var_os("THINBLK_CEPH_CONF").map(PathBuf::from) else {
        out.push_str("| all | not run: THINBLK_CEPH_CONF is not set | | | | |\n\n");
        return;
    };
    // thinblk finds the cluster the way librados does by default: through CEPH_CONF.
    std::env::set_var("CEPH_CONF", &conf);
    let image = format!("bench-{}", std::process::id());
    eprintln!("RBD image {POOL}/{image}");
    if let Err(e) = prepare(s, &conf, &image) {
        out.push_str(&format!("| all | not run: {e} | | | | |\n\n"));
        let _ = rbd_cli(&conf, &["rm", &format!("{POOL}/{image}")]);
        return;
    }
    let backing = format!("rbd={POOL}/{image}");
    let node = format!(
        "driver=rbd,node-name=r,pool={POOL},image={image},conf={}",
        conf.display()
    );
    for job in &s.jobs {
        let [t, q] = alternate(
            s.rounds,
            [
                &|| {
                    s.measure("thinblk rbd", job, IMAGE_SIZE, |sock| {
                        Server::thinblk(&backing, sock, &s.dir)
                    })
                },
                &|| {
                    s.measure("qsd rbd", job, IMAGE_SIZE, |sock| {
                        Server::qsd(std::slice::from_ref(&node), "r", sock, &s.dir)
                    })
                },
            ],
        );
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            job.name,
            show(&t),
            show(&q),
            ratio(&t, &q),
            cost(&t),
            cost(&q)
        ));
    }
    out.push('\n');
    if let Err(e) = rbd_cli(&conf, &["rm", &format!("{POOL}/{image}")]) {
        eprintln!("  {e}");
    }
}
