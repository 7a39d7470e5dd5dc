//! `thinblk generate`: man pages (clap_mangen) and shell completions (clap_complete), made
//! from the command-line definition itself so they never drift from `--help`.

use std::io;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// Writes `thinblk.1` and one `thinblk-SUBCOMMAND.1` per subcommand into `dir` (created if
/// missing); returns the files written.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    cmd.build();
    let mut written = Vec::new();
    let top = dir.join(format!("{}.1", cmd.get_name()));
    write_page(clap_mangen::Man::new(cmd.clone()), &top)?;
    written.push(top);
    for sub in cmd.get_subcommands() {
        // `help` is clap's own; its page would only say "print help".
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let name = format!("{}-{}", cmd.get_name(), sub.get_name());
        let page = dir.join(format!("{name}.1"));
        let sub = sub.clone().name(name.clone()).bin_name(name);
        write_page(clap_mangen::Man::new(sub), &page)?;
        written.push(page);
    }
    Ok(written)
}

fn write_page(man: clap_mangen::Man, path: &Path) -> io::Result<()> {
    let mut bytes = Vec::new();
    man.render(&mut bytes)?;
    std::fs::write(path, bytes)
}

/// The completion script for `shell`, written to `out`.
pub fn completions(cmd: clap::Command, shell: Shell, out: &mut dyn io::Write) {
    let mut cmd = cmd;
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// The file name a shell looks for (`thinblk.bash`, `_thinblk`, `thinblk.fish`, ...).
pub fn completion_file_name(shell: Shell, bin: &str) -> String {
    match shell {
        Shell::Zsh => format!("_{bin}"),
        Shell::PowerShell => format!("_{bin}.ps1"),
        Shell::Elvish => format!("{bin}.elv"),
        Shell::Fish => format!("{bin}.fish"),
        _ => format!("{bin}.bash"),
    }
}
