//! Browser end-to-end tests of the web demo: Debian's headless Chromium with
//! fake camera and microphone, driven by playwright-core
//! (`tests/browser/web-e2e.mjs`), against the real all-in-one binary.
//!
//! The binary and the browser run together in a fresh network namespace that
//! has only `lo` (`unshare --net`), so Chromium's ICE candidates cannot leave
//! loopback; the script also checks that the selected pair is on 127.0.0.1.
//! `scripts/test.sh` installs Chromium, iproute2 and playwright-core; a missing
//! one fails this test with a message saying so (never a silent skip).
//! Screenshots of every scenario land in `target/web-e2e/`. One scenario runs
//! matrix-js-sdk's own `MatrixCall` (bundled from `tests/interop/`) against the
//! conference bot instead of the demo's call code.

use std::path::{Path, PathBuf};
use std::time::Duration;

const SCENARIOS: [&str; 10] = [
    "one-to-one",
    "declined",
    "relay-unavailable",
    "ice-failed",
    "unreachable",
    "camera-denied",
    "conference",
    "lossy-conference",
    "simulcast-added",
    "js-sdk-conference",
];

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM_BIN").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Does the binary embed the TURN relay (its config has the relay's listener)?
/// Scenario 2, a relay-only call through it, runs when it does.
fn turn_relay_built() -> bool {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--print-config")
        .output()
        .expect("switchboard --print-config runs");
    let config = String::from_utf8_lossy(&out.stdout);
    config
        .split("\n[")
        .find(|section| section.starts_with("turn]"))
        .is_some_and(|turn| turn.contains("\nlistening_port = "))
}

fn is_root() -> bool {
    // The effective uid, from /proc (no libc dependency for one number).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn web_demo_in_chromium_calls_one_to_one_and_in_a_conference() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run scripts/test.sh, or `npm ci` in {}",
        dir.display()
    );
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/node_modules");
    assert!(
        interop.join("matrix-js-sdk").exists() && interop.join("esbuild").exists(),
        "matrix-js-sdk and esbuild are not installed: run scripts/test.sh, or `npm ci` in {}",
        interop.parent().unwrap_or(&interop).display()
    );
    let browser = chromium();
    assert!(
        browser.exists(),
        "Chromium is not installed at {} (Debian package `chromium`; scripts/test.sh installs it, \
         CHROMIUM_BIN names another path)",
        browser.display()
    );
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/web-e2e");
    std::fs::create_dir_all(&out_dir).expect("create target/web-e2e");

    let started = std::time::SystemTime::now();
    let mut scenarios = SCENARIOS.to_vec();
    if turn_relay_built() {
        scenarios.insert(2, "relay-only");
    } else {
        eprintln!("scenario relay-only (2) not run: this build has no TURN relay yet");
    }

    // One namespace with only loopback for the server and the browser. As
    // non-root, a user namespace grants the right to make it.
    let mut command = tokio::process::Command::new("unshare");
    if !is_root() {
        command.arg("--map-root-user");
    }
    command
        .args([
            "--net",
            "sh",
            "-c",
            r#"ip link set lo up && exec node web-e2e.mjs "$@""#,
            "sh",
        ])
        .arg(env!("CARGO_BIN_EXE_switchboard"))
        .arg(&out_dir)
        .args(&scenarios)
        .env("CHROMIUM_BIN", &browser)
        .current_dir(&dir)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(420), command.output())
        .await
        .expect("the browser scenarios finished within 7 minutes")
        .expect("unshare runs (util-linux)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let verdict = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or("");
    let checks: serde_json::Value = serde_json::from_str(verdict).unwrap_or_else(|_| {
        panic!(
            "no verdict from the browser scenarios (status {})\nstdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        )
    });
    for scenario in &scenarios {
        assert_eq!(
            checks[scenario],
            "ok",
            "scenario {scenario} failed: {verdict}\nscreenshots in {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out_dir.display()
        );
    }
    assert!(
        output.status.success(),
        "{verdict}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // Every scenario saved at least one screenshot during this run.
    for scenario in &scenarios {
        let fresh = std::fs::read_dir(&out_dir)
            .expect("read target/web-e2e")
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(&format!("{scenario}-")) && name.ends_with(".png")
            })
            .any(|e| e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t >= started));
        assert!(fresh, "scenario {scenario} saved a screenshot in {}", out_dir.display());
    }
}
