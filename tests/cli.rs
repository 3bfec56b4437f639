//! `mxgate check` and `mxgate explain` on real files.

mod common;

use common::{Files, run_cli};

#[test]
fn check_names_every_bad_line_and_fails() {
    let list = "deny 10.0.0.0/8\nnot-an-address\n\n10.1.2.3/8 # host bits\nallow 192.0.2.1\ndeny 2001:db8::/129\n";
    let f = Files::new("[access]\nlist = \"access.list\"\n", &[("access.list", list)]);
    let (code, out) = run_cli(&["check"], &f.config());
    assert_eq!(code, 1, "{out}");
    let file = f.path("access.list").display().to_string();
    for line in [2, 4, 6] {
        assert!(out.contains(&format!("{file}:{line}: ")), "line {line} must be named: {out}");
    }
    for line in [1, 3, 5] {
        assert!(!out.contains(&format!("{file}:{line}: ")), "line {line} is fine: {out}");
    }
}

#[test]
fn check_reports_problems_of_every_list_together() {
    let config = "[access]\nlist = \"access.list\"\n[abuse]\nwhitelist = \"white.list\"\n";
    let f = Files::new(config, &[("access.list", "bad\n"), ("white.list", "deny 10.0.0.1\n")]);
    let (code, out) = run_cli(&["check"], &f.config());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("access.list:1: "), "{out}");
    assert!(out.contains("white.list:1: ") && out.contains("bare entries only"), "{out}");
}

#[test]
fn check_names_config_keys_with_their_lines() {
    let f = Files::new("[listen]\nthreads = -1\nio = \"kqueue\"\n", &[]);
    let (code, out) = run_cli(&["check"], &f.config());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("mxgate.toml:2: listen.threads: "), "{out}");
    assert!(out.contains("mxgate.toml:3: listen.io: "), "{out}");
}

/// Impossible numbers are named with their line (issue 19): they used to pass, and their
/// arithmetic wrapped in release builds.
#[test]
fn check_refuses_impossible_ban_ends_and_offences() {
    let file_with = |line: &str| {
        let bans = format!("192.0.2.7 until=2030-01-01T00:00:00Z\n{line}\n");
        Files::new("[abuse]\nban_file = \"bans.list\"\n", &[("bans.list", &bans)])
    };
    for (line, why) in [
        ("192.0.2.8 until=99999999-01-01T00:00:00Z", "until: `99999999-01-01T00:00:00Z` is not an RFC 3339 UTC time"),
        (
            "192.0.2.9 until=2030-01-01T00:00:00Z offence=4294967295",
            "offence: `4294967295` is not a number from 1 to 1000",
        ),
    ] {
        let f = file_with(line);
        let (code, out) = run_cli(&["check"], &f.config());
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(&format!("{}:2: {why}", f.path("bans.list").display())), "{out}");
    }
    let long = Files::new("[abuse]\nban_duration = \"36526d\"\n", &[]);
    let out = run_cli(&["check"], &long.config()).1;
    assert!(out.contains("abuse.ban_duration: `36526d` is longer than the longest ban (36525d, 100 years)"), "{out}");
    // the command line refuses a ban past 100 years before asking anything
    let (code, out) = run_cli(&["ban", "192.0.2.88", "--for", "100000000d"], &long.config());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("longer than the longest ban"), "{out}");
}

#[test]
fn check_accepts_a_good_config() {
    let f = Files::new(
        "hostname = \"mx.example.com\"\n[access]\nlist = \"access.list\"\n[abuse]\nwhitelist = \"white.list\"\n",
        &[
            ("access.list", "# comment\ndeny 192.0.2.0/24\nallow 192.0.2.25\n2001:db8::/32\n"),
            ("white.list", "10.0.0.0/8\n"),
        ],
    );
    let (code, out) = run_cli(&["check"], &f.config());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("valid (3 access entries, 1 whitelist entries, 0 bans in the ban file)"), "{out}");
}

#[test]
fn check_reads_the_ban_file_an_operator_edited() {
    let bans = "192.0.2.7 until=2030-01-01T00:00:00Z reason=\"by hand\"\n192.0.2.8 until=tomorrow\n";
    let f = Files::new("[abuse]\nban_file = \"bans.list\"\n", &[("bans.list", bans)]);
    let (code, out) = run_cli(&["check"], &f.config());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("{}:2: until: `tomorrow`", f.path("bans.list").display())), "{out}");
    std::fs::write(f.path("bans.list"), &bans[..bans.find('\n').unwrap() + 1]).unwrap();
    let (code, out) = run_cli(&["check"], &f.config());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 bans in the ban file"), "{out}");
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mxgate.toml");
    let (code, out) = run_cli(&["check"], &example);
    assert_eq!(code, 0, "{out}");
}

/// `deploy/`: the fleet node's config is valid where the systemd unit and the Dockerfile
/// put it, and names only the folders they provide.
#[test]
fn the_deploy_example_is_valid_and_fits_its_unit_and_container() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let read = |name: &str| std::fs::read_to_string(deploy.join(name)).expect(name);
    let (config, unit, dockerfile) = (read("mxgate.toml"), read("mxgate.service"), read("Dockerfile"));
    // the unit runs and checks the config where the container puts it too
    assert!(unit.contains("ExecStart=/usr/local/bin/mxgate --config /etc/mxgate/mxgate.toml\n"), "{unit}");
    assert!(unit.contains("ExecStartPre=/usr/local/bin/mxgate --config /etc/mxgate/mxgate.toml check\n"));
    // the kernel fast path it turns on needs CAP_NET_ADMIN and netlink
    assert!(config.contains("[kernel]\nmode = \"drop\""), "{config}");
    for line in [
        "AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_NET_ADMIN",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "ProtectSystem=strict",
        "StateDirectory=mxgate",
        // ready when listening (NOTIFY_SOCKET), a refused reload fails the unit's reload
        "Type=notify",
        "ExecReload=/usr/local/bin/mxgate --config /etc/mxgate/mxgate.toml reload",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line}");
    }
    // every path it names lies in the unit's folders: configuration (read-only), state,
    // runtime, and the credentials systemd hands over (each one loaded by the unit)
    const CREDENTIALS: &str = "/run/credentials/mxgate.service/";
    let folders = ["/etc/mxgate/", "/var/lib/mxgate/", "/run/mxgate/", CREDENTIALS];
    let paths: Vec<&str> = config.split('"').filter(|w| w.starts_with('/')).collect();
    assert!(!paths.is_empty());
    for path in &paths {
        assert!(folders.iter().any(|f| path.starts_with(f)), "{path} is outside the unit's folders");
        if let Some(name) = path.strip_prefix(CREDENTIALS) {
            let load = format!("LoadCredential={name}:/etc/mxgate/{name}");
            assert!(unit.lines().any(|l| l == load), "{path}: the unit loads it ({load})");
        }
    }
    assert!(config.contains("ban_file = \"/var/lib/mxgate/"), "the ban file in the writable state folder");
    // valid, with its folders in a temporary one
    let root = tempfile::tempdir().expect("a folder");
    let at = |folder: &str| root.path().join(folder.trim_matches('/').replace('/', "-"));
    let mut text = config.clone();
    for folder in folders {
        std::fs::create_dir(at(folder)).expect("a folder");
        text = text.replace(folder, &format!("{}/", at(folder).display()));
    }
    for name in ["access.list", "whitelist.list"] {
        std::fs::write(at("/etc/mxgate/").join(name), "").expect("write");
    }
    std::fs::write(at(CREDENTIALS).join("redis.pass"), "secret\n").expect("write");
    let file = at("/etc/mxgate/").join("mxgate.toml");
    std::fs::write(&file, text).expect("write");
    let (code, out) = run_cli(&["check"], &file);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(", node ") && out.contains(" of the fleet on Redis at redis.internal:6380)"), "{out}");

    // the image starts on its own config, which needs no file the image lacks
    assert!(dockerfile.contains("COPY deploy/container.toml /etc/mxgate/mxgate.toml\n"), "{dockerfile}");
    let container = read("container.toml");
    let text = container.replace("/var/lib/mxgate/", &format!("{}/", at("/var/lib/mxgate/").display()));
    let file = root.path().join("container.toml");
    std::fs::write(&file, &text).expect("write");
    let (code, out) = run_cli(&["check"], &file);
    assert_eq!(code, 0, "{out}");
    assert!(!text.split('"').any(|w| w.starts_with("/etc/")), "no file from /etc/mxgate needed");
}

#[test]
fn explain_names_the_deciding_entry() {
    let list = "deny 127.0.0.0/8\nallow 127.0.1.0/24\ndeny 127.0.1.7\n";
    let f = Files::new("hostname = \"mx.test\"\n[access]\nlist = \"access.list\"\n", &[("access.list", list)]);
    let file = f.path("access.list").display().to_string();
    let (code, out) = run_cli(&["explain", "127.0.1.7"], &f.config());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("127.0.1.7: deny"), "{out}");
    assert!(out.contains(&format!("deny 127.0.1.7/32 at {file}:3")), "{out}");
    assert!(out.contains("reply: 530 5.7.1 mx.test ESMTP denied access at "), "{out}");

    let (_, out) = run_cli(&["explain", "::ffff:127.0.1.8"], &f.config());
    assert!(out.contains("judged as 127.0.1.8") && out.contains("127.0.1.8: allow"), "{out}");
    assert!(out.contains(&format!("allow 127.0.1.0/24 at {file}:2")), "{out}");

    let (_, out) = run_cli(&["explain", "192.0.2.1"], &f.config());
    assert!(out.contains("192.0.2.1: allow") && out.contains("no list entry matches"), "{out}");
}

/// The shadow list's verdict is shown beside the real one, with its line; a broken shadow
/// list is a problem like any list's.
#[test]
fn explain_shows_the_shadow_verdict_and_check_validates_the_shadow_list() {
    let config = "hostname = \"mx.test\"\n[access]\nlist = \"access.list\"\nshadow_list = \"next.list\"\n";
    let f = Files::new(config, &[("access.list", "deny 192.0.2.9\n"), ("next.list", "# soon\ndeny 192.0.2.0/24\n")]);
    let (code, out) = run_cli(&["explain", "192.0.2.1"], &f.config());
    assert!(code == 0 && out.contains("192.0.2.1: allow"), "{out}");
    assert!(out.contains("shadow list: would deny (") && out.contains("next.list, line 2; never enforced)"), "{out}");
    let (_, out) = run_cli(&["explain", "198.51.100.1"], &f.config());
    assert!(out.contains("shadow list: would allow (") && out.contains("its default"), "{out}");
    std::fs::write(f.path("next.list"), "deny 192.0.2.0/33\n").expect("write");
    let (code, out) = run_cli(&["check"], &f.config());
    assert!(code != 0 && out.contains("next.list:1"), "{out}");
}

#[test]
fn explain_says_whether_an_address_is_a_trusted_balancer() {
    let f = Files::new("[listen]\nproxy_protocol_from = [\"10.0.0.0/30\", \"2001:db8::1\"]\n", &[]);
    for (ip, trusted) in [("10.0.0.3", true), ("10.0.0.4", false), ("2001:db8::1", true), ("::ffff:10.0.0.1", true)] {
        let (code, out) = run_cli(&["explain", ip], &f.config());
        assert_eq!(code, 0, "{out}");
        assert_eq!(out.contains("a trusted balancer (listen.proxy_protocol_from)"), trusted, "{ip}: {out}");
    }
    let f = Files::new("[listen]\nproxy_protocol_from = [\"10.0.0.0/33\"]\n", &[]);
    let (code, out) = run_cli(&["check"], &f.config());
    assert!(code != 0 && out.contains("listen.proxy_protocol_from"), "{out}");
}

#[test]
fn explain_refuses_what_is_not_an_address() {
    let f = Files::new("", &[]);
    let (code, out) = run_cli(&["explain", "not-an-ip"], &f.config());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("invalid"), "{out}");
}

#[test]
fn reload_needs_a_control_socket() {
    let f = Files::new("hostname = \"mx.test\"\n", &[]);
    let (code, out) = run_cli(&["reload"], &f.config());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("needs [control] socket"), "{out}");
}

#[test]
fn ban_checks_its_arguments_before_asking() {
    let f = Files::new("hostname = \"mx.test\"\n[control]\nsocket = \"mxgate.sock\"\n", &[]);
    let (code, out) = run_cli(&["ban", "192.0.2.1", "--for", "soon"], &f.config());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("`soon` is not a duration"), "{out}");
    let (code, out) = run_cli(&["ban", "192.0.2.1", "--reason", "two\nlines"], &f.config());
    assert_eq!((code, out.as_str()), (1, "--reason: one line of at most 200 bytes\n"));
    let (code, out) = run_cli(&["ban", "192.0.2.1"], &f.config());
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("no running mxgate on "), "{out}");
}

/// `deploy/`'s probe examples ask what mxgate serves: HAProxy checks `/readyz` on the
/// metrics port (and the real HAProxy takes its file), Kubernetes' liveness `/healthz`
/// and readiness `/readyz`, with a grace period past the default drain.
#[test]
fn the_probe_examples_ask_for_health_and_readiness() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let read = |name: &str| std::fs::read_to_string(deploy.join(name)).expect(name);
    let (haproxy, kubernetes) = (read("haproxy.cfg"), read("kubernetes.yaml"));
    assert!(haproxy.contains("option httpchk GET /readyz\n") && haproxy.contains("check port 9425"), "{haproxy}");
    assert!(haproxy.contains("send-proxy-v2"), "the peer's address reaches mxgate");
    let liveness = kubernetes.split("livenessProbe:").nth(1).expect("a liveness probe");
    assert!(liveness.trim_start().starts_with("httpGet:\n              path: /healthz"), "{kubernetes}");
    let readiness = kubernetes.split("readinessProbe:").nth(1).expect("a readiness probe");
    assert!(readiness.trim_start().starts_with("httpGet:\n              path: /readyz"), "{kubernetes}");
    assert!(kubernetes.contains("terminationGracePeriodSeconds: 45\n"), "past the 30 s drain");
    match std::process::Command::new("haproxy").arg("-c").arg("-f").arg(deploy.join("haproxy.cfg")).output() {
        Ok(out) => assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr)),
        Err(_) => {
            assert!(std::env::var("CI").is_err(), "haproxy is not installed (.ci/run installs it)");
            eprintln!("SKIPPED: haproxy -c (apt-get install haproxy)");
        }
    }
}

/// The metric names in `text` (`mxgate_...` and `process_...`), a histogram's series
/// (`_bucket`, `_sum`, `_count`) by its own name.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (at, _) in text.match_indices("mxgate_").chain(text.match_indices("process_")) {
        let word: String =
            text[at..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        let histograms = mxgate::metrics::reference();
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| word.strip_suffix(s).filter(|n| histograms.iter().any(|m| m.name == *n)))
            .unwrap_or(&word)
            .to_owned();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// deploy/'s Grafana dashboard and Prometheus alert rules use only metrics mxgate
/// exports; the rules pass promtool, the dashboard is JSON Grafana reads (panels with
/// queries), and the alerts the issue asks for are there.
#[test]
fn the_dashboard_and_alerts_use_only_exported_metrics() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let read = |name: &str| std::fs::read_to_string(deploy.join(name)).expect(name);
    let (dashboard, alerts) = (read("grafana-dashboard.json"), read("prometheus-alerts.yml"));
    let exported: Vec<&str> = mxgate::metrics::reference().iter().map(|m| m.name).collect();
    for (file, text) in [("grafana-dashboard.json", &dashboard), ("prometheus-alerts.yml", &alerts)] {
        let names = metric_names(text);
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in names {
            assert!(exported.contains(&name.as_str()), "{file} uses {name}, which mxgate does not export");
        }
    }
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = json["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10 && panels.iter().all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())));
    for alert in
        ["MxgateNextHopDown", "MxgateRelayErrorRatio", "MxgateBanStorm", "MxgateRedisLost", "MxgateCertificateExpiring"]
    {
        assert!(alerts.contains(&format!("- alert: {alert}\n")), "{alert}");
    }
    match std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(deploy.join("prometheus-alerts.yml"))
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => {
            assert!(std::env::var("CI").is_err(), "promtool is not installed (.ci/run installs prometheus)");
            eprintln!("SKIPPED: promtool check rules (apt-get install prometheus)");
        }
    }
}

/// A command's output whose reader is gone (`mxgate explain ... | head -1`): the
/// command ends quietly, as Unix tools do (SIGPIPE), never a panic (exit 101).
#[test]
fn a_reader_that_goes_away_ends_a_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let f = Files::new("", &[]);
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader); // gone before the first line is written
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .args(["--config", &f.config().display().to_string(), "explain", "127.0.1.7"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("mxgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

/// What is valid but likely not meant is said by `check` (and logged at start): a
/// hostname that is not fully qualified, and no relay domain.
#[test]
fn check_warns_of_a_short_hostname_and_no_relay_domain() {
    let f = Files::new("hostname = \"mx\"\n", &[]);
    let (code, out) = run_cli(&["check"], &f.config());
    assert_eq!(code, 0, "valid: {out}");
    assert!(out.contains("warning: hostname \"mx\" is not a fully qualified name"), "{out}");
    assert!(out.contains("warning: relay.domains is empty: no recipient is accepted"), "{out}");
    let f = Files::new("hostname = \"mx.example.com\"\n[relay]\ndomains = [\"example.com\"]\n", &[]);
    let (code, out) = run_cli(&["check"], &f.config());
    assert!(code == 0 && !out.contains("warning:"), "{out}");
}

/// A second instance started on an address the first listens on is refused ("address
/// in use"), not joined to the first's SO_REUSEPORT group to take part of its traffic;
/// `[listen] share = true` joins on purpose.
#[test]
fn a_second_instance_on_the_same_address_is_refused_unless_shared() {
    let first = common::Mxgate::start("hostname = \"mx.test\"\n", &[], "epoll");
    let addr = first.addr();
    let second = |share: bool| {
        let text =
            format!("hostname = \"mx2.test\"\n[listen]\naddresses = [\"{addr}\"]\nshare = {share}\nio = \"epoll\"\n");
        Files::new(&text, &[])
    };
    let f = second(false);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .arg("--config")
        .arg(f.config())
        .output()
        .expect("mxgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on {addr}: address in use")), "{stderr}");
    // the first still has its address to itself
    let mut s = common::connect_from("127.0.1.9", addr);
    assert!(common::read_replies(&mut s, 1).starts_with("220 mx.test "));
    // shared on purpose: it starts
    let f = second(true);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mxgate"))
        .arg("--config")
        .arg(f.config())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mxgate");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().expect("stderr")));
    let started = lines.find(|l| l.as_ref().is_ok_and(|l| l.contains("mxgate listening") || l.contains("ERROR")));
    let _ = child.kill();
    let _ = child.wait();
    let line = started.expect("a start-up line").expect("text");
    assert!(line.contains("mxgate listening"), "{line}");
}

/// The image's HEALTHCHECK (bash's /dev/tcp, as the slim image has no HTTP client) asks
/// /healthz: run as written against a live mxgate's metrics listener it passes, and
/// against a port nothing serves it fails.
#[test]
fn the_container_healthcheck_asks_healthz() {
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/Dockerfile")).unwrap();
    let at = dockerfile.find("CMD [\"bash\", \"-c\", \"").expect("a HEALTHCHECK in bash");
    let json = dockerfile[at + 4..].lines().next().expect("its line");
    let cmd: Vec<String> = serde_json::from_str(json).expect("CMD's exec form is JSON");
    assert!(cmd[2].contains("GET /healthz"), "{}", cmd[2]);
    let m = common::Mxgate::start("[metrics]\nlisten = \"127.0.0.1:0\"\n", &[], "epoll");
    let line = m.saw("metrics at http://").expect("the metrics address is logged");
    let port = line.rsplit(':').next().and_then(|p| p.strip_suffix("/metrics")).expect("a port");
    let run = |port: &str| {
        let script = cmd[2].replace("9425", port);
        std::process::Command::new(&cmd[0]).args(["-c", &script]).status().expect("bash").success()
    };
    assert!(run(port), "healthy: passes");
    assert!(!run(&common::unused_port().port().to_string()), "nothing listening: fails");
}
