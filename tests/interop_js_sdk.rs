//! matrix-js-sdk (Element Web's SDK), a real third-party client, against the
//! homeserver: `tests/interop/js-sdk-smoke.mjs` run by Node.js.
//! `scripts/test.sh` installs it (`npm ci` in `tests/interop`).

mod common;

use common::TestServer;
use std::path::Path;

#[tokio::test]
async fn matrix_js_sdk_registers_syncs_and_messages() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        dir.join("node_modules/matrix-js-sdk").exists(),
        "matrix-js-sdk is not installed: run scripts/test.sh, or `npm ci` in {}",
        dir.display()
    );
    let server = TestServer::start().await;
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new("node")
            .arg("js-sdk-smoke.mjs")
            .arg(&server.base)
            .current_dir(&dir)
            .output(),
    )
    .await
    .expect("the js-sdk script finished in time")
    .expect("node runs (Node.js is on every machine here)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let verdict = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or("");
    assert!(
        output.status.success(),
        "js-sdk smoke failed: {verdict}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let checks: serde_json::Value = serde_json::from_str(verdict).expect("a JSON verdict line");
    for check in ["joined", "message", "toDevice", "turn", "history", "members", "profile"] {
        assert_eq!(checks[check], true, "check {check} of {verdict}");
    }
}
