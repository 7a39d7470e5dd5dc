//! `--sections rbd`: thinblk's raw `rbd=` export and a thin disk of a thinblk pool on RBD
//! images, against qemu-storage-daemon's `rbd` driver (QEMU's librbd block driver, from
//! qemu-block-extra) on an image of the same Ceph cluster, the three servers in turn. The cluster is `THINBLK_CEPH_CONF`'s (scripts/ceph-cluster.sh makes one);
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

/// A thin pool whose metadata and data devices are the RBD images `tag`-meta and `tag`-data
/// (made on first use), with its catalog in `pool_dir`.
struct ThinOnRbd {
    tag: String,
    pool_dir: PathBuf,
}

impl ThinOnRbd {
    /// `thinblk serve` exporting the thin disk `spec` of this pool at `socket`, one queue.
    fn serve(&self, spec: &str, socket: &Path, dir: &Path) -> Result<Server, String> {
        let mut cmd = Command::new(crate::server::this_build());
        cmd.arg("serve")
            .arg("--dir")
            .arg(&self.pool_dir)
            .arg("--metadata")
            .arg(format!("rbd:{POOL}/{}-meta", self.tag))
            .arg("--data")
            .arg(format!("rbd:{POOL}/{}-data", self.tag))
            .args(["--metadata-size", "64M", "--data-size"])
            .arg((2 * IMAGE_SIZE).to_string())
            .arg("--export")
            .arg(format!("{spec},socket={},queues=1", socket.display()))
            .env("RUST_LOG", "warn");
        Server::spawn("thinblk", cmd, socket, dir)
    }

    /// Makes the pool and a thin disk `vm` of IMAGE_SIZE, written whole (every block
    /// provisioned, as the raw image is written whole).
    fn prepare(&self, s: &Settings) -> Result<(), String> {
        std::fs::create_dir_all(&self.pool_dir).map_err(|e| format!("pool dir: {e}"))?;
        let sock = s.dir.join("rbd-thin-fill.sock");
        let server = self.serve(&format!("name=vm,size={IMAGE_SIZE}"), &sock, &s.dir)?;
        let mut c = Client::connect(&sock, 8 << 20)?;
        eprintln!("  writing a thin disk of a pool on {POOL}/{}-*", self.tag);
        c.fill(IMAGE_SIZE, 1 << 20, 8)
            .map_err(|e| format!("{e} ({})", server.log_tail()))?;
        drop(c);
        drop(server);
        Ok(())
    }

    fn remove(&self, conf: &Path) {
        for which in ["meta", "data"] {
            if let Err(e) = rbd_cli(conf, &["rm", &format!("{POOL}/{}-{which}", self.tag)]) {
                eprintln!("  {e}");
            }
        }
    }
}

pub fn section(s: &Settings, out: &mut String) {
    out.push_str(
        "### Ceph RBD image (one-node cluster on this machine), one queue\n\n\
         | job | thinblk rbd= | thin on rbd | qsd rbd | rbd=/qsd | thin/qsd | thinblk cost | thin cost | qsd cost |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let Some(conf) = std::env::var_os("THINBLK_CEPH_CONF").map(PathBuf::from) else {
        out.push_str("| all | not run: THINBLK_CEPH_CONF is not set | | | | | | | |\n\n");
        return;
    };
    // thinblk finds the cluster the way librados does by default: through CEPH_CONF.
    std::env::set_var("CEPH_CONF", &conf);
    let image = format!("bench-{}", std::process::id());
    eprintln!("RBD image {POOL}/{image}");
    if let Err(e) = prepare(s, &conf, &image) {
        out.push_str(&format!("| all | not run: {e} | | | | | | | |\n\n"));
        let _ = rbd_cli(&conf, &["rm", &format!("{POOL}/{image}")]);
        return;
    }
    let thin = ThinOnRbd {
        tag: format!("bench-thin-{}", std::process::id()),
        pool_dir: s.dir.join("rbd-thin-pool"),
    };
    let thin_ready = thin.prepare(s);
    let backing = format!("rbd={POOL}/{image}");
    let node = format!(
        "driver=rbd,node-name=r,pool={POOL},image={image},conf={}",
        conf.display()
    );
    for job in &s.jobs {
        let [t, th, q] = alternate(
            s.rounds,
            [
                &|| {
                    s.measure("thinblk rbd", job, IMAGE_SIZE, |sock| {
                        Server::thinblk(&backing, sock, &s.dir)
                    })
                },
                &|| {
                    s.measure("thin on rbd", job, IMAGE_SIZE, |sock| {
                        thin_ready.clone()?;
                        thin.serve("name=vm", sock, &s.dir)
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
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            job.name,
            show(&t),
            show(&th),
            show(&q),
            ratio(&t, &q),
            ratio(&th, &q),
            cost(&t),
            cost(&th),
            cost(&q)
        ));
    }
    out.push('\n');
    thin.remove(&conf);
    if let Err(e) = rbd_cli(&conf, &["rm", &format!("{POOL}/{image}")]) {
        eprintln!("  {e}");
    }
}
