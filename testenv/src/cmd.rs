//! Running host tools with errors that name the tool and the command line.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

/// The command line of `cmd` as one shell-like string, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_quote(a));
    }
    s
}

/// Quotes a word for a POSIX shell (single quotes).
pub fn shell_quote(word: &OsStr) -> String {
    let w = word.to_string_lossy();
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        w.into_owned()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `cmd` to completion, capturing its output. Fails with a message
/// naming the tool (and a hint which package provides it) when it is missing,
/// and with the command line plus the tail of stderr when it fails.
pub fn run(cmd: &mut Command, hint: &str) -> Result<Output> {
    let line = describe(cmd);
    let out = cmd.stdin(Stdio::null()).output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "tool `{}` not found ({hint}); command was: {line}",
                cmd.get_program().to_string_lossy()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot run: {line}")),
    };
    if !out.status.success() {
        bail!(
            "command failed ({}): {line}\n--- stderr (tail) ---\n{}\n--- stdout (tail) ---\n{}",
            out.status,
            tail(&out.stderr, 30),
            tail(&out.stdout, 10)
        );
    }
    Ok(out)
}

/// Like [`run`] but returns stdout as text.
pub fn run_text(cmd: &mut Command, hint: &str) -> Result<String> {
    let out = run(cmd, hint)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
