//! The `switchboard` command line: config layers, errors and `--print-config`.

use std::process::Command;

fn switchboard(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("SWITCHBOARD_CONFIG")
        .output()
        .expect("run switchboard");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn print_config_shows_layers_and_masks_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("switchboard.toml");
    std::fs::write(
        &file,
        "server_name = \"from-file.org\"\n[turn]\nstatic_auth_secret = \"topsecret\"\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = switchboard(
        &[
            "--config",
            file.to_str().unwrap(),
            "--print-config",
            "--set",
            "rate_limit.login_burst=9",
        ],
        &[("SWITCHBOARD_HTTP_BIND", "127.0.0.1:9999")],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("server_name = \"from-file.org\""), "{stdout}");
    assert!(stdout.contains("bind = \"127.0.0.1:9999\""), "{stdout}");
    assert!(stdout.contains("login_burst = 9"), "{stdout}");
    assert!(!stdout.contains("topsecret"), "the secret is masked: {stdout}");

    // Flags beat the environment.
    let (ok, stdout, _) = switchboard(
        &["--print-config", "--server-name", "flag.org"],
        &[("SWITCHBOARD_SERVER_NAME", "env.org")],
    );
    assert!(ok);
    assert!(stdout.contains("server_name = \"flag.org\""));
}

#[test]
fn bad_config_names_the_key() {
    for (args, env, key) in [
        (vec!["--print-config", "--bind", "nope"], vec![], "http.bind"),
        (
            vec!["--print-config"],
            vec![("SWITCHBOARD_HTTP_BINDD", "x")],
            "SWITCHBOARD_HTTP_BINDD",
        ),
        (vec!["--print-config", "--set", "turn.uris=stun:x"], vec![], "turn.uris"),
        (vec!["--print-config", "--log-format", "xml"], vec![], "log.format"),
        (vec!["--print-config", "--set", "unknown.key=1"], vec![], "unknown.key"),
        (vec!["turn", "--bind", "127.0.0.1:0"], vec![], "turn.static_auth_secret"),
    ] {
        let (ok, _, stderr) = switchboard(&args, &env);
        assert!(!ok, "{args:?} must fail");
        assert!(stderr.contains(key), "{args:?}: error should name {key}: {stderr}");
    }
}

#[test]
fn json_logs_on_request_and_no_secrets_in_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--bind",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args([
            "--set",
            "turn.static_auth_secret=s3cr3t-value",
            "--set",
            "turn.listening_port=0",
            "--set",
            "log.level=debug",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the start line, then stop the server.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    for _ in 0..20 {
        line.clear();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr
        .lines()
        .find(|l| l.contains("switchboard started"))
        .expect("a start log line");
    let parsed: serde_json::Value = serde_json::from_str(first).expect("log lines are JSON");
    assert_eq!(parsed["fields"]["message"], "switchboard started");
    assert!(!stderr.contains("s3cr3t-value"));
}
