//! Settings as the binary reads them from its environment: which `KPAY_*`
//! variables are settings and which are not.

mod common;

use common::kpay_command;

/// Runs `kpay rebuild --dry-run` over an empty data directory with `env`:
/// it loads the settings first, so a refused setting is its error.
fn stderr_with(env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = kpay_command();
    command.args([
        "--data-dir",
        dir.path().to_str().unwrap(),
        "rebuild",
        "--dry-run",
    ]);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stderr)
}

#[test]
fn variables_kubernetes_injects_are_not_settings() {
    // A Service named `kpay` puts KPAY_PORT, KPAY_SERVICE_HOST and KPAY_PORT_8080_TCP_* into every pod: kpay starts regardless, and a real setting beside them still applies.
    let kubernetes = [
        ("KPAY_PORT", "tcp://10.96.0.12:8080"),
        ("KPAY_SERVICE_HOST", "10.96.0.12"),
        ("KPAY_SERVICE_PORT", "8080"),
        ("KPAY_PORT_8080_TCP", "tcp://10.96.0.12:8080"),
        ("KPAY_PORT_8080_TCP_ADDR", "10.96.0.12"),
    ];
    let (_, stderr) = stderr_with(&kubernetes);
    assert!(!stderr.contains("config"), "{stderr}");
    // The same variables with a bad setting: the setting is what stops the start.
    let mut with_bad = kubernetes.to_vec();
    with_bad.push(("KPAY_LOG__PARTITIONS", "0"));
    let (ok, stderr) = stderr_with(&with_bad);
    assert!(!ok && stderr.contains("log.partitions"), "{stderr}");
    assert!(!stderr.contains("port"), "{stderr}");
}

#[test]
fn section_keys_and_shortcuts_are_still_checked() {
    // An unknown key or a bad value in KPAY_<SECTION>__<KEY> form, or a bad KPAY_TOKENS, stops the start and names it.
    let cases = [
        ("KPAY_SERVER__NO_SUCH_KEY", "1", "no_such_key"),
        ("KPAY_LOG__PARTITIONS", "many", "partitions"),
        ("KPAY_TOKENS", "short:operator", "8 characters"),
    ];
    for (key, value, named) in cases {
        let (ok, stderr) = stderr_with(&[(key, value)]);
        let lower = stderr.to_lowercase();
        assert!(!ok && lower.contains(named), "{key}={value}: {stderr}");
    }
}

#[test]
fn allowed_hosts_and_origins_are_arrays_in_the_environment() {
    // KPAY_SERVER__ALLOWED_HOSTS and KPAY_SERVER__ALLOWED_ORIGINS take TOML arrays; a bad entry or a bare string stops the start and names the key.
    let good = [
        (
            "KPAY_SERVER__ALLOWED_HOSTS",
            r#"["kpay.internal", "[fd00::1]"]"#,
        ),
        ("KPAY_SERVER__ALLOWED_ORIGINS", r#"["https://ops.example"]"#),
    ];
    let (_, stderr) = stderr_with(&good);
    assert!(!stderr.contains("config"), "{stderr}");
    let cases = [
        (
            "KPAY_SERVER__ALLOWED_HOSTS",
            r#"["kpay.internal:8080"]"#,
            "server.allowed_hosts",
        ),
        (
            "KPAY_SERVER__ALLOWED_ORIGINS",
            r#"["https://ops.example/app"]"#,
            "server.allowed_origins",
        ),
        (
            "KPAY_SERVER__ALLOWED_ORIGINS",
            "https://ops.example",
            "allowed_origins",
        ),
    ];
    for (key, value, named) in cases {
        let (ok, stderr) = stderr_with(&[(key, value)]);
        let lower = stderr.to_lowercase();
        assert!(!ok && lower.contains(named), "{key}={value}: {stderr}");
    }
}
