//! The `portcullis` binary: thin command-line verbs over the library. `anyhow` lives only here.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{anyhow, Context as _};
use clap::{Parser, Subcommand};
use portcullis::{
    config::{self, LoadedConfig},
    proxy::{
        handoff::{HandedSocket, InheritedSockets, Role, SocketInfo, Upgrade, UpgradeListener},
        reload, Gateway,
    },
    telemetry,
};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Portcullis: a zero-trust API gateway.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with a config file.
    Run {
        /// The config file.
        #[arg(long, short, default_value = "portcullis.yaml")]
        config: PathBuf,
        /// Worker threads (overrides `server.workers`; default one per CPU core).
        #[arg(long)]
        workers: Option<usize>,
        /// Take over from the gateway running on the config's `server.upgrade_socket`: receive
        /// its listening sockets, serve them, then let it drain and exit (zero-downtime restart).
        #[arg(long)]
        upgrade: bool,
        /// Like `--upgrade`, from the gateway listening on this upgrade socket (for when the
        /// config's `server.upgrade_socket` changed).
        #[arg(long, value_name = "SOCKET", conflicts_with = "upgrade")]
        upgrade_from: Option<PathBuf>,
    },
    /// Check config files; print every problem as FILE:LINE:COL: field: message.
    Validate {
        /// Config files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run a self-contained demo: gateway on 127.0.0.1:8080 with a built-in backend.
    Demo {
        /// Where the demo gateway listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the demo's admin API listens.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
    },
    /// Explain what the gateway would decide for a request, and why. Exits 0 for allow, 3 for deny.
    Explain(ExplainArgs),
    /// Print the JSON Schema of the config file (for editor completion).
    Schema,
    /// Benchmark helper: writes a JWKS and a token per algorithm (ES256, RS256) to a directory.
    #[command(hide = true)]
    BenchTokens {
        /// Output directory.
        dir: PathBuf,
    },
    /// API key helpers.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// The config file.
    #[arg(long, short)]
    config: PathBuf,
    /// The request method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// The request path (as the client would send it; it is normalised like a real request).
    #[arg(long)]
    path: String,
    /// The `Host` of the request (for routes that match hosts).
    #[arg(long, default_value = "")]
    host: String,
    /// A request header, `NAME: VALUE` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// The listener the request arrives on (default: the first).
    #[arg(long)]
    listener: Option<String>,
    /// The client's address (for `client_ip_in` conditions).
    #[arg(long, default_value = "127.0.0.1")]
    client_ip: std::net::IpAddr,
    /// A token, verified like the gateway would (sent as `Authorization: Bearer`).
    #[arg(long, conflicts_with_all = ["claims", "api_key"])]
    token: Option<String>,
    /// Claims as JSON, taken as if a verified token carried them.
    #[arg(long, conflicts_with = "api_key")]
    claims: Option<String>,
    /// An API key.
    #[arg(long)]
    api_key: Option<String>,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print a new random API key and the SHA-256 to put in the config.
    Generate {
        /// The identity the key will authenticate (shown in the config snippet).
        #[arg(long, default_value = "client-1")]
        id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            config,
            workers,
            upgrade,
            upgrade_from,
        } => run(&config, workers, upgrade, upgrade_from),
        Command::Validate { files } => return validate(&files),
        Command::Demo { listen, admin } => demo(listen, admin),
        Command::Explain(args) => return explain(args),
        Command::Schema => schema(),
        Command::BenchTokens { dir } => bench_tokens(&dir),
        Command::Key {
            command: KeyCommand::Generate { id },
        } => {
            let (key, digest) = portcullis::policy::authn::generate_key();
            println!("key:    {key}");
            println!("sha256: {digest}\n");
            println!("# give the key to the client; put only the hash in the config:");
            println!("authentication:\n  api_keys:\n    - name: my-keys\n      keys:\n        - id: {id}\n          sha256: {digest}");
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Text printed once the gateway is up (the demo's instructions).
type Banner = Box<dyn FnOnce(&Gateway) -> String>;

/// How `serve` starts the gateway.
#[derive(Default)]
struct Launch {
    workers: Option<usize>,
    /// The config file, watched and reloaded (`None` for the demo).
    watch: Option<PathBuf>,
    /// Printed once everything is bound.
    banner: Option<Banner>,
    /// Take the listening sockets over from the gateway on this upgrade socket.
    upgrade_from: Option<PathBuf>,
}

fn run(
    path: &Path,
    workers: Option<usize>,
    upgrade: bool,
    upgrade_from: Option<PathBuf>,
) -> anyhow::Result<()> {
    let loaded = config::load_file(path).map_err(|errors| anyhow!("invalid config:\n{errors}"))?;
    let upgrade_from = match (upgrade, upgrade_from) {
        (_, Some(socket)) => Some(socket),
        (true, None) => Some(loaded.upgrade_socket().ok_or_else(|| {
            anyhow!(
                "--upgrade needs `server.upgrade_socket` in {} (where the running gateway \
                 listens), or --upgrade-from SOCKET",
                path.display()
            )
        })?),
        (false, None) => None,
    };
    if upgrade_from.is_some() {
        // everything that can be checked without the sockets is checked before asking for them:
        // a config that does not compile never gets the running gateway involved
        let registry = portcullis::upstream::UpstreamRegistry::new(1);
        portcullis::proxy::compile(&loaded, &registry, 0)
            .map_err(|errors| anyhow!("invalid config:\n{errors}"))?;
    }
    serve(
        loaded,
        Launch {
            workers,
            watch: Some(path.to_owned()),
            banner: None,
            upgrade_from,
        },
    )
}

/// Starts the gateway and the admin API on this thread's control runtime and serves until a
/// stop signal or a hand-over to a successor.
fn serve(loaded: LoadedConfig, launch: Launch) -> anyhow::Result<()> {
    let server = &loaded.config.server;
    telemetry::init(server.log.format, &server.log.level);
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    // resolved now: a binary replaced on disk later is the one a successor runs
    let program = std::env::current_exe().context("cannot find this program's path")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build the control runtime")?;
    runtime.block_on(async move {
        let signals = reload::Signals::install().context("cannot install signal handlers")?;
        let upgrade_socket = loaded.upgrade_socket();
        let mut handoff = match &launch.upgrade_from {
            Some(socket) => {
                let mut upgrade = Upgrade::connect(socket).await?;
                tracing::info!(
                    old_pid = upgrade.old_pid(),
                    sockets = upgrade.sockets().remaining().count(),
                    "received the running gateway's listening sockets"
                );
                Some(upgrade)
            }
            None => None,
        };
        // a gateway started on its own claims its upgrade socket first: if another gateway
        // answers there, this one stops before binding anything
        let mut upgrade_listener = match (&handoff, &upgrade_socket) {
            (None, Some(path)) => Some(UpgradeListener::bind(path).await?),
            _ => None,
        };
        // a successor that gives up says what that means for the running gateway
        let abandon = |error: anyhow::Error| match launch.upgrade_from {
            Some(_) => error.context("upgrade abandoned, the running gateway was left as it was"),
            None => error,
        };
        let mut no_sockets = InheritedSockets::default();
        let inherited = handoff.as_mut().map_or(&mut no_sockets, |h| h.sockets());
        let gateway = Gateway::start_with_sockets(&loaded, launch.workers, inherited)
            .map_err(|error| abandon(error.into()))?;
        // the workers accept from here on: a failure must drain the gateway, not drop it
        let admin = match start_admin(&gateway, inherited) {
            Ok(admin) => admin,
            Err(error) => {
                gateway.shutdown().await;
                return Err(abandon(error));
            }
        };
        for unused in inherited.remaining() {
            tracing::info!(listener = %unused.name, addr = %unused.local, "not in this config: closing the socket handed over");
        }
        if let Some(handoff) = handoff {
            let old_pid = handoff.old_pid();
            if let Err(error) = handoff.finish().await {
                gateway.shutdown().await;
                return Err(abandon(error.into()));
            }
            tracing::info!(old_pid, "the previous gateway stopped accepting: this one serves");
            match &upgrade_socket {
                Some(path) => match UpgradeListener::take_over(path) {
                    Ok(listener) => upgrade_listener = Some(listener),
                    Err(error) => tracing::error!(%error, "this gateway cannot be upgraded without a restart"),
                },
                None => tracing::warn!("no `server.upgrade_socket` in this config: this gateway cannot be upgraded without a restart"),
            }
        }
        tracing::info!(workers = gateway.worker_count(), "portcullis started");
        if launch.upgrade_from.is_none() {
            // a successor is not the service's main process until its predecessor says so
            portcullis::proxy::systemd::ready();
        }
        if let Some(banner) = launch.banner {
            println!("{}", banner(&gateway));
        }
        let upgrades = upgrade_listener.map(|listener| reload::Upgrades {
            successor: launch.watch.as_deref().map(|config| {
                successor_command(program, config, launch.workers, listener.path())
            }),
            listener,
            admin,
        });
        reload::run_until_stopped(gateway, launch.watch, signals, upgrades).await?;
        Ok(())
    })
}

/// What SIGUSR2 runs: this program on the same config and worker count, taking over from the
/// gateway on `socket`.
fn successor_command(
    program: PathBuf,
    config: &Path,
    workers: Option<usize>,
    socket: &Path,
) -> reload::SuccessorCommand {
    let mut args: Vec<std::ffi::OsString> = vec!["run".into(), "--config".into(), config.into()];
    if let Some(workers) = workers {
        args.extend(["--workers".into(), workers.to_string().into()]);
    }
    args.extend(["--upgrade-from".into(), socket.into()]);
    reload::SuccessorCommand { program, args }
}

/// Serves the admin API on the socket handed over, if it is on the configured address, or on a
/// new one. Returns a copy of the socket (for a later hand-over) and the serving task.
fn start_admin(
    gateway: &Gateway,
    inherited: &mut InheritedSockets,
) -> anyhow::Result<Option<(HandedSocket, tokio::task::AbortHandle)>> {
    let Some(admin) = gateway.snapshot().admin_bind else {
        return Ok(None);
    };
    let socket = match inherited.take_admin(admin) {
        Some(handed) => handed.socket,
        None => portcullis::proxy::bind_tcp(admin)
            .with_context(|| format!("cannot bind the admin listener on {admin}"))?,
    };
    let local = socket.local_addr()?;
    let copy = socket.try_clone()?;
    let listener = tokio::net::TcpListener::from_std(socket)?;
    tracing::info!(addr = %local, "admin listening");
    if gateway.snapshot().admin_token.is_none() {
        tracing::warn!(
            "no admin token (admin.token or PORTCULLIS_ADMIN_TOKEN): the admin API serves \
             only the probes, the dashboard page and /metrics (unless it requires a token)"
        );
    }
    let task = tokio::spawn(portcullis::admin::serve(listener, gateway.state()));
    let copy = HandedSocket {
        info: SocketInfo {
            role: Role::Admin,
            name: "admin".into(),
            configured: admin,
            local,
        },
        socket: copy,
    };
    Ok(Some((copy, task.abort_handle())))
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        let result = config::load_file(file).and_then(|loaded| {
            let registry = portcullis::upstream::UpstreamRegistry::new(1);
            portcullis::proxy::compile(&loaded, &registry, 0).map(|snapshot| (loaded, snapshot))
        });
        match result {
            Ok((loaded, snapshot)) => {
                for warning in loaded.warnings.iter().chain(&snapshot.warnings) {
                    println!("{warning}");
                }
                println!("{}: ok", file.display());
            }
            Err(errors) => {
                failed = true;
                println!("{errors}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn demo(listen: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
    let identity = portcullis::demo::DemoIdentity::generate();
    // the backend (and the demo's identity provider) runs on its own thread and runtime, like any
    // other upstream would
    let (backend_tx, backend_rx) = std::sync::mpsc::channel();
    let jwks = identity.jwks.clone();
    std::thread::Builder::new()
        .name("demo-backend".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let Ok(runtime) = runtime else { return };
            runtime.block_on(async move {
                match portcullis::demo::start_backend(
                    "127.0.0.1:0".parse().expect("valid address"),
                    jwks,
                )
                .await
                {
                    Ok((addr, task)) => {
                        let _ = backend_tx.send(Ok(addr));
                        let _ = task.await;
                    }
                    Err(error) => {
                        let _ = backend_tx.send(Err(error));
                    }
                }
            });
        })?;
    let backend = backend_rx.recv().context("demo backend thread ended")??;
    let loaded = portcullis::demo::load_config(backend, listen, admin, &identity.admin_api_token)
        .map_err(|errors| anyhow!("demo config:\n{errors}"))?;
    serve(
        loaded,
        Launch {
            banner: Some(Box::new(move |gateway: &Gateway| {
                let public = gateway.local_addr("public").unwrap_or(listen);
                portcullis::demo::instructions(
                    public,
                    gateway.snapshot().admin_bind,
                    backend,
                    &identity,
                )
            })),
            ..Launch::default()
        },
    )
}

fn bench_tokens(dir: &Path) -> anyhow::Result<()> {
    use aws_lc_rs::{
        encoding::AsDer,
        rsa::KeySize,
        signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
    };
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    std::fs::create_dir_all(dir)?;
    let now = portcullis::policy::authn::unix_now();
    let claims = serde_json::json!({"sub": "bench", "iss": "bench", "aud": "bench", "iat": now, "exp": now + 86_400, "roles": ["bench"]});
    let ec =
        EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).map_err(|_| anyhow!("EC key"))?;
    let point = ec.public_key().as_ref().to_vec();
    let rsa =
        aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048).map_err(|_| anyhow!("RSA key"))?;
    let rsa_pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'static>>::as_der(&rsa)
        .map_err(|_| anyhow!("RSA der"))?;
    let rsa_pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(rsa_pkcs8.as_ref())
    );
    let public = rsa.public_key();
    let jwks = serde_json::json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "es", "alg": "ES256", "x": b64(&point[1..33]), "y": b64(&point[33..65])},
        {"kty": "RSA", "kid": "rs", "alg": "RS256", "n": b64(public.modulus().big_endian_without_leading_zero()),
         "e": b64(public.exponent().big_endian_without_leading_zero())},
    ]});
    std::fs::write(dir.join("jwks.json"), jwks.to_string())?;
    let sign = |alg, kid: &str, key: &jsonwebtoken::EncodingKey| -> anyhow::Result<String> {
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some(kid.into());
        Ok(jsonwebtoken::encode(&header, &claims, key)?)
    };
    let es = sign(
        jsonwebtoken::Algorithm::ES256,
        "es",
        &jsonwebtoken::EncodingKey::from_ec_der(
            ec.to_pkcs8v1().map_err(|_| anyhow!("EC der"))?.as_ref(),
        ),
    )?;
    let rs = sign(
        jsonwebtoken::Algorithm::RS256,
        "rs",
        &jsonwebtoken::EncodingKey::from_rsa_pem(rsa_pem.as_bytes())?,
    )?;
    std::fs::write(dir.join("es256.token"), es)?;
    std::fs::write(dir.join("rs256.token"), rs)?;
    Ok(())
}

/// Exit status of `explain` for a denied request (0 is allowed, 1 an error).
const EXIT_DENIED: u8 = 3;

fn explain(args: ExplainArgs) -> ExitCode {
    match explain_request(args) {
        Ok(explanation) => {
            print!("{}", explanation.text);
            if explanation.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_DENIED)
            }
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn explain_request(args: ExplainArgs) -> anyhow::Result<portcullis::explain::Explanation> {
    use portcullis::explain::{Credential, Query};
    let loaded =
        config::load_file(&args.config).map_err(|errors| anyhow!("invalid config:\n{errors}"))?;
    let registry = portcullis::upstream::UpstreamRegistry::new(1);
    let snapshot = portcullis::proxy::compile(&loaded, &registry, 0)
        .map_err(|errors| anyhow!("invalid config:\n{errors}"))?;
    let credential = match (args.token, args.claims, args.api_key) {
        (Some(token), _, _) => Credential::Token(token),
        (_, Some(claims), _) => Credential::Claims(
            serde_json::from_str(&claims).context("--claims must be a JSON object")?,
        ),
        (_, _, Some(key)) => Credential::ApiKey(key),
        _ => Credential::None,
    };
    let mut headers = http::HeaderMap::new();
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| anyhow!("--header `{header}` is not `NAME: VALUE`"))?;
        headers.append(
            http::HeaderName::from_bytes(name.trim().as_bytes())
                .with_context(|| format!("`{name}` is not a header name"))?,
            http::HeaderValue::from_str(value.trim())
                .with_context(|| format!("`{value}` is not a header value"))?,
        );
    }
    let query = Query {
        headers,
        method: http::Method::from_bytes(args.method.as_bytes())
            .map_err(|_| anyhow!("`{}` is not an HTTP method", args.method))?,
        path: args.path,
        host: args.host,
        listener: args.listener,
        client_ip: args.client_ip,
        credential,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build a runtime")?;
    Ok(runtime.block_on(portcullis::explain::explain(&snapshot, &query)))
}

fn schema() -> anyhow::Result<()> {
    let schema = schemars::schema_for!(config::Config);
    println!("{}", serde_json::to_string_pretty(&schema)?);
    Ok(())
}
