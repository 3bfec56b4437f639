//! `mxgate-loadtest SCENARIO [options]`: drives mxgate (or any SMTP server on loopback)
//! with many peers and checks every answer; exit status 1 when a check fails, 2 when the
//! run could not be made.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use loadtest::scenario::{self, Options, Scenario};

#[derive(Parser)]
#[command(
    name = "mxgate-loadtest",
    about = "Load-tests mxgate with legitimate and hostile peers and checks every answer"
)]
struct Cli {
    /// deny-storm, relay, dictionary, mixed, slowloris, reload, drain or tls.
    scenario: String,
    /// A running server on loopback to load.
    #[arg(long, value_name = "ADDR")]
    target: Option<SocketAddr>,
    /// Start this mxgate binary with a generated configuration (and stop it at the end).
    #[arg(long, value_name = "PATH")]
    spawn: Option<PathBuf>,
    /// The spawned mxgate's I/O driver: auto, uring or epoll.
    #[arg(long)]
    io: Option<String>,
    /// How long to make new connections (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: std::time::Duration,
    /// Conversations at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Client threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Source addresses, a prefix in 127.0.0.0/8 or ::1 (default: 127.66.0.0/16 for
    /// deny-storm, 127.77.0.0/16 for relay).
    #[arg(long, value_name = "PREFIX")]
    sources: Option<String>,
    /// MAIL, RCPT and DATA in one write, as real MTAs send them.
    #[arg(long)]
    pipeline: bool,
    /// Each message in one `BDAT <n> LAST` chunk (CHUNKING) in place of DATA.
    #[arg(long)]
    bdat: bool,
    /// The sink offers XCLIENT (Postfix's) and greets again after one.
    #[arg(long)]
    sink_xclient: bool,
    #[arg(long, default_value_t = 1)]
    messages_per_connection: u32,
    /// Bytes of each message's content.
    #[arg(long, default_value_t = 2048)]
    body_size: usize,
    /// banned-flood: the spawned mxgate's [kernel] mode: off, drop or reset.
    #[arg(long, default_value = "off", value_parser = ["off", "drop", "reset"])]
    kernel: String,
    /// banned-flood: connection attempts a second.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// banned-flood: how long to flood before the measured phase.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    warmup: std::time::Duration,
    /// What the deny line starts with.
    #[arg(long, default_value = "530")]
    expect: String,
    /// Where the sink (the next hop of the relay scenarios) listens; with --target, the
    /// target must relay to it.
    #[arg(long, value_name = "ADDR")]
    sink: Option<SocketAddr>,
    /// relay: no sink, delivery not checked here (the target's next hop is someone
    /// else's, e.g. the C yardstick's; loadtest/compare.sh checks its count).
    #[arg(long)]
    unchecked: bool,
    /// The recipients' domain (with --target: one the target relays).
    #[arg(long, default_value = loadtest::scenario::RCPT_DOMAIN)]
    domain: String,
    /// `reload`: SIGHUP the spawned mxgate this often.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    reload_every: std::time::Duration,
    /// `tls` with --target: the root certificate (PEM) the target's chains to.
    #[arg(long, value_name = "FILE")]
    tls_root: Option<PathBuf>,
    /// `tls` with --target: the name the target's certificate bears.
    #[arg(long, default_value = loadtest::scenario::SPAWNED_NAME)]
    tls_name: String,
    /// deny-storm and relay: every connection first sends a PROXY header (v1 or v2)
    /// carrying its own address, as a load balancer in front of the target would (a
    /// spawned mxgate trusts 127.0.0.0/8 for it; with --target, the target must).
    #[arg(long, value_name = "v1|v2", value_parser = parse_proxy)]
    proxy: Option<loadtest::proxy::Version>,
    /// The same figures as JSON, in this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// The latency percentile distribution of each phase, drawn in this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

fn parse_proxy(s: &str) -> Result<loadtest::proxy::Version, String> {
    match s {
        "v1" => Ok(loadtest::proxy::Version::V1),
        "v2" => Ok(loadtest::proxy::Version::V2),
        _ => Err(format!("`{s}`: v1 or v2")),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n.parse().map_err(|_| format!("`{s}`: a number and a unit (ms, s, m)"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(60 * n)),
        _ => Err(format!("`{s}`: the unit is ms, s or m")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let scenario = match Scenario::parse(&cli.scenario) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let opts = Options {
        scenario,
        target: cli.target,
        spawn: cli.spawn,
        io: cli.io,
        duration: cli.duration,
        concurrency: cli.concurrency,
        threads: cli.threads,
        sources: cli.sources,
        pipeline: cli.pipeline,
        bdat: cli.bdat,
        messages_per_connection: cli.messages_per_connection,
        body_size: cli.body_size,
        expect: cli.expect,
        sink: cli.sink,
        sink_drops_every: 0,
        sink_xclient: cli.sink_xclient,
        progress: true,
        unchecked: cli.unchecked,
        reload_every: cli.reload_every,
        domain: cli.domain,
        tls_root: cli.tls_root,
        tls_name: cli.tls_name,
        proxy: cli.proxy,
        kernel: cli.kernel,
        rate: cli.rate,
        warmup: cli.warmup,
    };
    let report = match scenario::run(&opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mxgate-loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report.json()).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if let Some(path) = &cli.plot
        && let Err(e) = report.plot(path)
    {
        eprintln!("{e}");
        return ExitCode::from(2);
    }
    if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
