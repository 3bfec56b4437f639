//! The fleet end to end: three (or four) real mxgate nodes sharing bans and failure counts
//! through a real redis-server started on a free loopback port, no persistence. Nodes run
//! on both drivers at once (a, c: io_uring; b: epoll); each peer its own loopback address.
//! Without redis-server these tests print a skip line (in CI they fail).

#[macro_use]
mod common;

use common::config::Config;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{Mxgate, connect_from, read_replies, read_to_end, run_cli, send, wait_until};

const UNKNOWN: &str = "500 5.5.2 command unrecognized\r\n";
const THRESHOLD: usize = 6;

fn config(redis: &RedisServer, node: &str) -> String {
    Config::new()
        .extra(&format!(
            "[abuse]\nwhitelist = \"white.list\"\nban_file = \"bans.list\"\nfailure_threshold = {THRESHOLD}\n\
             escalate_after = 0\n[cluster]\nredis = \"{}\"\nnode = \"{node}\"\nflush_interval = \"50ms\"\n\
             [control]\nsocket = \"mxgate.sock\"\n",
            redis.url()
        ))
        .to_string()
}

/// Node `name` of the fleet, whitelisting `white`, once it is connected to Redis.
fn node(redis: &RedisServer, name: &str, white: &str) -> Mxgate {
    node_with(&config(redis, name), name, white)
}

/// Node `name` on `config` (b on epoll, the others on io_uring), once it is connected.
fn node_with(config: &str, name: &str, white: &str) -> Mxgate {
    let io = if name == "b" { "epoll" } else { "uring" };
    let mut m = Mxgate::start(config, &[("white.list", white)], io);
    m.wait_for_log_once(&format!("cluster: node {name} connected to Redis"));
    m
}

fn fleet() -> Option<(RedisServer, [Mxgate; 3])> {
    let redis = RedisServer::start()?;
    let nodes = [node(&redis, "a", ""), node(&redis, "b", ""), node(&redis, "c", "")];
    Some((redis, nodes))
}

/// One conversation from `source` with `failures` unknown commands; returns when the
/// last failing reply has arrived.
fn fail(m: &Mxgate, source: &str, failures: usize) -> Instant {
    let mut s = connect_from(source, m.addr());
    assert_eq!(read_replies(&mut s, 1), "220 mx.test ESMTP mxgate\r\n", "{source}");
    send(&mut s, &b"BOGUS\r\n".repeat(failures));
    assert_eq!(read_replies(&mut s, failures), UNKNOWN.repeat(failures), "{source}");
    let failed = Instant::now();
    send(&mut s, b"QUIT\r\n");
    read_to_end(&mut s);
    failed
}

/// Whether `m` refuses `source` at the gate (the deny line instead of the banner).
fn refuses(m: &Mxgate, source: &str) -> bool {
    let s = connect_from(source, m.addr());
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("a first line");
    assert!(line.starts_with("530 ") || line.starts_with("220 "), "{source}: {line:?}");
    line.starts_with("530 ")
}

fn ban_lines(nodes: &mut [Mxgate], source: &str) -> usize {
    let text = format!("IP address {source} banned");
    nodes
        .iter_mut()
        .map(|m| {
            m.drain_log();
            m.seen.iter().filter(|l| l.contains(&text)).count()
        })
        .sum()
}

#[test]
fn a_ban_on_one_node_is_refused_by_the_others_within_100ms() {
    let Some((_redis, [a, b, c])) = fleet() else { return };
    let source = "127.0.14.1";
    fail(&a, source, THRESHOLD - 1);
    let failed = fail(&a, source, 1);
    let mut refused_by = Vec::new();
    while refused_by.len() < 2 {
        for (name, m) in [("b", &b), ("c", &c)] {
            if !refused_by.contains(&name) && refuses(m, source) {
                refused_by.push(name);
            }
        }
        assert!(failed.elapsed() < Duration::from_millis(100), "refused by {refused_by:?} only, after 100 ms");
    }
    assert!(refuses(&a, source));
}

#[test]
fn failures_split_across_the_nodes_ban_once_in_the_fleet() {
    let Some((_redis, mut nodes)) = fleet() else { return };
    let source = "127.0.14.2";
    // two on each: none reaches the threshold (6) alone
    for m in &nodes {
        fail(m, source, 2);
    }
    for m in &nodes {
        wait_until("the fleet's ban in force everywhere", || refuses(m, source));
    }
    // the one node that made it logged the ban, the two others that they took it in
    let banned = format!("IP address {source} banned");
    let logged = |m: &mut Mxgate, text: &str| {
        m.drain_log();
        m.seen.iter().filter(|l| l.contains(text)).count()
    };
    wait_until("each node logged the ban or took it in", || {
        nodes.iter_mut().all(|m| logged(m, &banned) + logged(m, "ban from ") > 0)
    });
    let made: Vec<usize> = (0..3).filter(|&i| nodes[i].saw(&banned).is_some()).collect();
    assert_eq!(made.len(), 1, "one node makes the ban: {made:?}");
    let maker = made[0];
    let line = nodes[maker].saw(&banned).unwrap_or_default().to_owned();
    assert!(line.contains("6 failures across the fleet"), "{line}");
    let maker_name = ["a", "b", "c"][maker];
    for (i, m) in nodes.iter_mut().enumerate().filter(|(i, _)| *i != maker) {
        assert!(m.saw(&format!("ban from {maker_name}: {source} until ")).is_some(), "node {i} took it in");
    }
    assert_eq!(ban_lines(&mut nodes, source), 1, "exactly one ban line in the fleet");
}

#[test]
fn unban_on_one_node_lifts_the_ban_everywhere() {
    let Some((redis, [mut a, b, c])) = fleet() else { return };
    let source = "127.0.14.3";
    fail(&a, source, THRESHOLD);
    for m in [&b, &c] {
        wait_until("banned on the others", || refuses(m, source));
    }
    assert!(redis.get(&format!("mxgate:ban:{source}")).is_some_and(|l| l.contains(" node=a")));
    let (code, out) = run_cli(&["unban", source], &c.files.config());
    assert_eq!(code, 0, "{out}");
    for m in [&a, &b, &c] {
        wait_until("lifted everywhere", || !refuses(m, source));
    }
    a.wait_for_log_once(&format!("IP address {source} unbanned by the operator on c"));
    assert_eq!(redis.get(&format!("mxgate:ban:{source}")), None, "the key is deleted");
}

#[test]
fn a_node_started_after_the_ban_refuses_from_its_first_connection() {
    let Some((redis, [a, _b, _c])) = fleet() else { return };
    let source = "127.0.14.4";
    fail(&a, source, THRESHOLD);
    wait_until("the ban in Redis", || redis.get(&format!("mxgate:ban:{source}")).is_some());
    let mut d = Mxgate::start(&config(&redis, "d"), &[("white.list", "")], "uring");
    assert!(refuses(&d, source), "refused from the first connection");
    let loaded = d.wait_for_log_once(&format!("ban from a: {source} until "));
    assert!(loaded.contains("INFO"), "{loaded}");
    let explain = || run_cli(&["explain", source], &d.files.config()).1;
    assert!(explain().contains("made by node a of the fleet"), "{}", explain());
    // the ban file is written by its own thread, in batches
    wait_until("written to the ban file as a's", || explain().contains(", made by node a) in "));
}

#[test]
fn a_node_that_whitelists_an_address_keeps_serving_it() {
    let Some(redis) = RedisServer::start() else { return };
    let source = "127.0.14.5";
    let a = node(&redis, "a", "");
    let mut b = node(&redis, "b", &format!("{source}\n"));
    let c = node(&redis, "c", "");
    fail(&a, source, THRESHOLD);
    wait_until("banned on c", || refuses(&c, source));
    let said = b.wait_for_log_once(&format!("cluster: not applying the ban on {source} from a: whitelisted here"));
    assert!(said.contains("INFO"), "{said}");
    assert!(!refuses(&b, source), "b serves it");
    // heard again (a later node's load, a second publication): said once
    let (code, out) = run_cli(&["ban", source, "--for", "1h"], &a.files.config());
    assert_eq!(code, 0, "{out}");
    wait_until("the new ban in Redis", || {
        redis.get(&format!("mxgate:ban:{source}")).is_some_and(|l| l.contains("no reason given"))
    });
    assert!(refuses(&c, source));
    b.drain_log();
    assert_eq!(b.seen.iter().filter(|l| l.contains("not applying the ban")).count(), 1, "logged once");
    assert!(!refuses(&b, source));
    let stats = run_cli(&["stats"], &b.files.config()).1;
    assert!(stats.contains("cluster_ignored 2"), "{stats}");
}

#[test]
fn without_redis_each_node_keeps_serving_and_banning_and_catches_up_after() {
    let Some((mut redis, [mut a, mut b, mut c])) = fleet() else { return };
    let before = "127.0.14.13";
    fail(&a, before, THRESHOLD);
    wait_until("a ban before Redis is lost", || refuses(&c, before));
    redis.kill();
    for m in [&mut a, &mut b, &mut c] {
        let warned = m.wait_for_log_once("cluster: lost Redis at 127.0.0.1:");
        assert!(warned.contains("WARN") && warned.contains("banning on this node alone"), "{warned}");
    }
    // nothing waits on Redis: a flood of refusals (a's bans) and sessions go on
    let (a_source, b_source) = ("127.0.14.6", "127.0.14.7");
    fail(&a, a_source, THRESHOLD);
    fail(&b, b_source, THRESHOLD);
    a.wait_for_log_once(&format!("IP address {a_source} banned"));
    let flood = Instant::now();
    for _ in 0..200 {
        assert!(refuses(&a, a_source) && refuses(&b, b_source), "banned locally");
    }
    let took = flood.elapsed();
    assert!(took < Duration::from_secs(5), "400 refusals took {took:?}: something waits on Redis");
    assert!(!refuses(&c, a_source) && !refuses(&c, b_source), "c has not heard (Redis is down)");
    let stats = run_cli(&["stats"], &a.files.config()).1;
    assert!(stats.contains("cluster_connected 0"), "{stats}");
    // Redis back (empty): the bans made meanwhile reach the others
    redis.restart();
    for m in [&c, &b] {
        wait_until("a's ban reaches the others", || refuses(m, a_source));
    }
    wait_until("b's ban reaches the others", || refuses(&a, b_source) && refuses(&c, b_source));
    // Redis came back empty: a's ban from before is written again, for nodes that start later
    wait_until("bans in force written again", || redis.get(&format!("mxgate:ban:{before}")).is_some());
    let d = Mxgate::start(&config(&redis, "d"), &[("white.list", "")], "epoll");
    assert!(refuses(&d, before) && refuses(&d, a_source) && refuses(&d, b_source), "a later node has them all");
    for (m, name) in [(&mut a, "a"), (&mut b, "b"), (&mut c, "c")] {
        m.wait_for_log_once(&format!("cluster: node {name} connected to Redis"));
        m.drain_log();
        let lost = m.seen.iter().filter(|l| l.contains("cluster: lost Redis")).count();
        assert_eq!(lost, 1, "{name}: one warning while it was down");
        let back = m.seen.iter().filter(|l| l.contains(&format!("cluster: node {name} connected"))).count();
        assert_eq!(back, 2, "{name}: one line at start, one when it is back");
    }
    let stats = run_cli(&["stats"], &a.files.config()).1;
    assert!(stats.contains("cluster_connected 1"), "{stats}");
}

#[test]
fn garbage_in_redis_is_logged_and_ignored() {
    let Some((redis, [mut a, b, _c])) = fleet() else { return };
    let source = "127.0.14.8";
    for bad in ["hello", "ban 127.0.14.8 until=tomorrow node=x", "unban 127.0.14.8", "ban 127.0.14.8 node=x\u{1}"] {
        redis.cmd(&["PUBLISH", "mxgate:bans", bad]);
    }
    let logged = a.wait_for_log_once("cluster: ignored a message on the channel");
    assert!(logged.contains("WARN"), "{logged}");
    // a key holding garbage, and a key holding another address's ban
    redis.cmd(&["SET", "mxgate:ban:127.0.14.8", "garbage"]);
    redis.cmd(&["SET", "mxgate:ban:127.0.14.9", "127.0.14.10 until=2099-01-01T00:00:00Z node=x"]);
    let mut d = Mxgate::start(&config(&redis, "d"), &[("white.list", "")], "epoll");
    d.wait_for_log_once("cluster: ignored a ban key");
    for m in [&a, &b, &d] {
        for s in [source, "127.0.14.9", "127.0.14.10"] {
            assert!(!refuses(m, s), "{s}: nothing banned by garbage");
        }
    }
    // and the fleet still works
    fail(&a, source, THRESHOLD);
    wait_until("a real ban still propagates", || refuses(&b, source) && refuses(&d, source));
    let stats = run_cli(&["stats"], &a.files.config()).1;
    assert!(stats.contains("cluster_ignored 4"), "{stats}");
}

#[test]
fn over_tls_with_a_password() {
    let Some(redis) = RedisServer::start_with(true, Some("fleet-secret")) else { return };
    let start = |name: &str, password: &str| {
        let config = config(&redis, name).replace("[control]", "password_file = \"redis.pass\"\n[control]");
        let files = [("white.list", ""), ("redis.pass", password)];
        let ca = redis.ca_file();
        Mxgate::start_as(&config, &files, "epoll", "epoll", |c| {
            c.env("SSL_CERT_FILE", &ca);
        })
    };
    let mut a = start("a", "fleet-secret\n");
    let mut b = start("b", "fleet-secret\n");
    for (m, name) in [(&mut a, "a"), (&mut b, "b")] {
        m.wait_for_log_once(&format!("cluster: node {name} connected to Redis"));
    }
    let source = "127.0.14.11";
    fail(&a, source, THRESHOLD);
    wait_until("the ban crosses over TLS", || refuses(&b, source));
    // a wrong password: the node says so, and serves alone
    let mut c = start("c", "wrong\n");
    let warned = c.wait_for_log_once("cluster: cannot reach Redis at 127.0.0.1:");
    assert!(warned.contains("WARN"), "{warned}");
    assert!(!refuses(&c, source), "c is not in the fleet");
    fail(&c, "127.0.14.12", THRESHOLD);
    c.wait_for_log_once("IP address 127.0.14.12 banned");
    assert!(refuses(&c, "127.0.14.12"), "c still bans on its own");
}

/// Bans of a /24's addresses made on different nodes add up to the prefix's escalation,
/// and one node bans the prefix for the fleet.
#[test]
fn bans_across_the_nodes_escalate_the_prefix_once() {
    let Some(redis) = RedisServer::start() else { return };
    let start =
        |name: &str| node_with(&config(&redis, name).replace("escalate_after = 0", "escalate_after = 4"), name, "");
    let mut nodes = [start("a"), start("b"), start("c")];
    // two addresses banned on a, two on b: none made four itself
    for (i, source) in ["127.0.16.1", "127.0.16.2", "127.0.16.3", "127.0.16.4"].into_iter().enumerate() {
        let m = &nodes[i / 2];
        fail(m, source, THRESHOLD);
        for other in &nodes {
            wait_until("each ban everywhere", || refuses(other, source));
        }
    }
    for m in &nodes {
        wait_until("the /24 refused on every node", || refuses(m, "127.0.16.200"));
    }
    let banned = "IP address 127.0.16.0/24 banned: 4 addresses banned in the prefix";
    wait_until("the prefix's ban logged once and taken in twice", || {
        nodes.iter_mut().all(|m| {
            m.drain_log();
            m.saw(banned).is_some() || m.saw("ban from ").is_some_and(|_| m.saw(": 127.0.16.0/24 until").is_some())
        })
    });
    let made = nodes.iter().filter(|m| m.saw(banned).is_some()).count();
    assert_eq!(made, 1, "one node made the prefix's ban");
}

/// With Redis unreachable, a node escalates on its own, as a single node does, and the
/// fleet gets the prefix's ban when Redis is back.
#[test]
fn without_redis_a_node_escalates_alone() {
    let Some(mut redis) = RedisServer::start() else { return };
    let mut a = node_with(&config(&redis, "a").replace("escalate_after = 0", "escalate_after = 2"), "a", "");
    let b = node(&redis, "b", "");
    redis.kill();
    a.wait_for_log_once("cluster: lost Redis");
    fail(&a, "127.0.17.1", THRESHOLD);
    fail(&a, "127.0.17.2", THRESHOLD);
    a.wait_for_log_once("IP address 127.0.17.0/24 banned: 2 addresses banned in the prefix");
    assert!(refuses(&a, "127.0.17.200"));
    redis.restart();
    wait_until("the prefix's ban reaches b", || refuses(&b, "127.0.17.200"));
}

/// A shadow node counts towards the fleet but never claims (issue 19): its flush may be
/// the one that carries the count to the threshold, and the next failure on an enforcing
/// node then bans.
#[test]
fn a_shadow_node_crossing_the_threshold_leaves_the_ban_to_an_enforcing_node() {
    let Some(redis) = RedisServer::start() else { return };
    let mut a = node(&redis, "a", "");
    let mut b =
        node_with(&config(&redis, "b").replace("escalate_after = 0", "escalate_after = 0\nshadow = true"), "b", "");
    let source = "127.0.18.1";
    let sent = |m: &Mxgate| {
        let (_, out) = run_cli(&["stats"], &m.files.config());
        out.lines().find_map(|l| l.strip_prefix("cluster_failures_sent ")?.parse::<u64>().ok()).unwrap_or(0)
    };
    fail(&a, source, 2);
    wait_until("a's two failures in Redis", || sent(&a) == 2);
    fail(&b, source, THRESHOLD - 2);
    b.wait_for_log_once(&format!("shadow: would ban {source}: {THRESHOLD} failures across the fleet"));
    assert!(!refuses(&a, source) && !refuses(&b, source), "nobody banned it yet");
    fail(&a, source, 1);
    a.wait_for_log_once(&format!("IP address {source} banned: {} failures across the fleet", THRESHOLD + 1));
    assert!(refuses(&a, source));
    b.drain_log();
    assert!(b.saw(&format!("IP address {source} banned")).is_none(), "the shadow node made no ban");
}

/// A command Redis refuses (here an ACL user without PUBLISH) drops its batch with one
/// warning: the connection is kept, the batch's other commands took effect, and later
/// batches are not held behind it (issue 19: one refused command used to stop everything
/// else reaching the fleet, retried for ever).
#[test]
fn a_command_redis_refuses_drops_its_batch_never_the_connection() {
    let Some(redis) = RedisServer::start() else { return };
    redis.cmd(&["ACL", "SETUSER", "nopublish", "on", ">pw", "~*", "&*", "+@all", "-publish"]);
    let config = config(&redis, "a")
        .replace("redis://127.0.0.1", "redis://nopublish@127.0.0.1")
        .replace("[control]", "password_file = \"redis.pass\"\n[control]");
    let mut a = Mxgate::start(&config, &[("white.list", ""), ("redis.pass", "pw\n")], "uring");
    a.wait_for_log_once("cluster: node a connected to Redis");
    for source in ["127.0.19.1", "127.0.19.2", "127.0.19.3"] {
        fail(&a, source, THRESHOLD);
        wait_until("the ban's key set in Redis", || redis.get(&format!("mxgate:ban:{source}")).is_some());
    }
    let stats = run_cli(&["stats"], &a.files.config()).1;
    let refused = stats.lines().find_map(|l| l.strip_prefix("cluster_commands_refused ")?.parse::<u64>().ok());
    assert!(refused.is_some_and(|n| n >= 3) && stats.contains("cluster_connected 1\n"), "{stats}");
    a.drain_log();
    let warnings = a.seen.iter().filter(|l| l.contains("cluster: Redis refused a command")).count();
    assert_eq!(warnings, 1, "one warning a minute");
    assert!(a.saw("cluster: lost Redis").is_none(), "the connection was kept");
}

/// The least ACL docs/fleet.md recommends is enough: a node under it
/// connects, shares a ban and lifts it, and nothing is refused.
#[test]
fn a_node_runs_under_the_acl_the_docs_recommend() {
    let Some(redis) = RedisServer::start() else { return };
    let fleet = include_str!("../docs/fleet.md");
    let acl = fleet.lines().find(|l| l.starts_with("ACL SETUSER mxgate ")).expect("the ACL in docs/fleet.md");
    let mut words: Vec<&str> = acl.split_whitespace().collect();
    let secret = words.iter().position(|w| *w == ">SECRET").expect(">SECRET");
    words[secret] = ">pw";
    redis.cmd(&words);
    let config = config(&redis, "a")
        .replace("redis://127.0.0.1", "redis://mxgate@127.0.0.1")
        .replace("[control]", "password_file = \"redis.pass\"\n[control]");
    let mut a = Mxgate::start(&config, &[("white.list", ""), ("redis.pass", "pw\n")], "uring");
    a.wait_for_log_once("cluster: node a connected to Redis");
    let b = node(&redis, "b", "");
    let source = "127.0.19.9";
    fail(&a, source, THRESHOLD);
    wait_until("the ban reaches b", || refuses(&b, source));
    let (code, out) = run_cli(&["unban", source], &a.files.config());
    assert_eq!(code, 0, "{out}");
    wait_until("the lift reaches b", || !refuses(&b, source));
    let stats = run_cli(&["stats"], &a.files.config()).1;
    assert!(stats.contains("cluster_commands_refused 0\n") && stats.contains("cluster_connected 1\n"), "{stats}");
    a.drain_log();
    assert!(a.saw("cluster: lost Redis").is_none() && a.saw("refused").is_none());
}

/// Bans adopted from the fleet follow `[kernel]` on the node that adopts them: node a bans
/// an address by hand, node b (kernel `reset`, `after_refusals = 0`) resets its attempts
/// in the kernel; a's unban lifts it from b's kernel too.
#[test]
fn a_fleet_ban_reaches_another_node_s_kernel_and_its_lift_too() {
    if !common::root("nf_tables (CAP_NET_ADMIN)") {
        return;
    }
    let Some(redis) = RedisServer::start() else { return };
    let table = format!("mxgate_fleet_{}", std::process::id());
    let _cleanup = common::NftTable(table.clone());
    let a = node(&redis, "a", "");
    let kernel = format!("[kernel]\nmode = \"reset\"\ntable = \"{table}\"\nafter_refusals = 0\n");
    let mut b = node_with(&(config(&redis, "b") + &kernel), "b", "");
    b.wait_for_log_once("kernel fast path on");
    let source = "127.0.14.40";
    let reset = |m: &Mxgate| {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.bind(&std::net::SocketAddr::new(source.parse().expect("ip"), 0).into()).expect("bind");
        matches!(socket.connect_timeout(&m.addr().into(), Duration::from_secs(1)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    let (code, out) = run_cli(&["ban", source], &a.files.config());
    assert_eq!(code, 0, "{out}");
    wait_until("the fleet's ban in b's kernel", || reset(&b));
    assert!(refuses(&a, source), "a, without [kernel], refuses it in user space");
    let (code, out) = run_cli(&["unban", source], &a.files.config());
    assert_eq!(code, 0, "{out}");
    wait_until("lifted from b's kernel", || !reset(&b) && !refuses(&b, source));
}
