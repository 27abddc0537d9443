//! gRPC through the gateway: a real tonic service behind an `h2c://` upstream, called by a tonic
//! client over HTTP/2 (unary, server streaming, an error status carried in trailers) and by
//! gRPC-Web clients over HTTP/1.1 (binary and base64 text), with the route's policies applied.

use std::{convert::Infallible, future::Future, net::SocketAddr, pin::Pin, time::Duration};

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use prost::Message as _;
use tonic::Status;

use crate::support::*;

#[derive(Clone, PartialEq, prost::Message)]
struct Hello {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(uint32, tag = "2")]
    count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Reply {
    #[prost(string, tag = "1")]
    message: String,
}

type Codec = tonic_prost::ProstCodec<Reply, Hello>;
type ClientCodec = tonic_prost::ProstCodec<Hello, Reply>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// `Greeter/Say`: one reply, or `PERMISSION_DENIED` for the name `mallory`; it also says which
/// subject the gateway vouched for.
struct Say;

impl tonic::server::UnaryService<Hello> for Say {
    type Response = Reply;
    type Future = BoxFuture<Result<tonic::Response<Reply>, Status>>;

    fn call(&mut self, request: tonic::Request<Hello>) -> Self::Future {
        Box::pin(async move {
            let subject = request
                .metadata()
                .get("x-auth-subject")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("nobody")
                .to_owned();
            let hello = request.into_inner();
            if hello.name == "mallory" {
                return Err(Status::permission_denied("mallory may not be greeted"));
            }
            Ok(tonic::Response::new(Reply {
                message: format!("hello {} (for {subject})", hello.name),
            }))
        })
    }
}

/// `Greeter/SayMany`: `count` replies, streamed.
struct SayMany;

impl tonic::server::ServerStreamingService<Hello> for SayMany {
    type Response = Reply;
    type ResponseStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<Reply, Status>> + Send>>;
    type Future = BoxFuture<Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: tonic::Request<Hello>) -> Self::Future {
        Box::pin(async move {
            let hello = request.into_inner();
            let replies = (0..hello.count).map(move |i| {
                Ok(Reply {
                    message: format!("{} #{i}", hello.name),
                })
            });
            let stream: Self::ResponseStream = Box::pin(tokio_stream::iter(replies));
            Ok(tonic::Response::new(stream))
        })
    }
}

/// The tonic service on an h2c server.
async fn grpc_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = service_fn(|request: Request<Incoming>| async move {
                let mut grpc = tonic::server::Grpc::new(Codec::default());
                let response = match request.uri().path() {
                    "/test.Greeter/Say" => grpc.unary(Say, request).await,
                    "/test.Greeter/SayMany" => grpc.server_streaming(SayMany, request).await,
                    _ => Status::unimplemented("no such method").into_http(),
                };
                Ok::<_, Infallible>(response)
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn gateway(upstream: SocketAddr) -> TestGateway {
    TestGateway::start(&format!(
        "server:\n  watch_config: false\nadmin:\n  enabled: false\n\
         listeners:\n  - name: main\n    bind: 127.0.0.1:0\n    http2: true\n\
         upstreams:\n  - name: greeter\n    targets: [{{ url: \"h2c://{upstream}\" }}]\n\
         authentication:\n  api_keys:\n    - name: keys\n      keys:\n\
         \x20       - {{ id: alice, sha256: {}, roles: [caller] }}\n\
         authorization:\n  roles:\n    - name: caller\n      permissions: [\"POST /test.Greeter/**\"]\n\
         routes:\n  - name: greeter\n    match: {{ path: /test.Greeter/** }}\n    auth: [keys]\n    upstream: greeter\n    grpc_web: true\n",
        digest("key-alice")
    ))
    .await
}

fn grpc_client(
    gateway: &TestGateway,
) -> tonic::client::Grpc<Client<HttpConnector, tonic::body::Body>> {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let origin: Uri = gateway.url("").trim_end_matches('/').parse().unwrap();
    tonic::client::Grpc::with_origin(client, origin)
}

fn with_key<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-api-key", "key-alice".parse().unwrap());
    request
}

#[tokio::test]
async fn grpc_clients_reach_a_tonic_service_with_trailers_intact() {
    let gateway = gateway(grpc_upstream().await).await;
    let mut client = grpc_client(&gateway);
    let say = http::uri::PathAndQuery::from_static("/test.Greeter/Say");

    client.ready().await.unwrap();
    let reply = client
        .unary(
            with_key(Hello {
                name: "ada".into(),
                count: 0,
            }),
            say.clone(),
            ClientCodec::default(),
        )
        .await
        .expect("unary call succeeds");
    assert_eq!(reply.into_inner().message, "hello ada (for alice)");

    // an error status travels in the trailers: it must arrive as sent
    client.ready().await.unwrap();
    let status = client
        .unary(
            with_key(Hello {
                name: "mallory".into(),
                count: 0,
            }),
            say.clone(),
            ClientCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.message(), "mallory may not be greeted");

    // server streaming: every message, then the OK trailers
    client.ready().await.unwrap();
    let mut stream = client
        .server_streaming(
            with_key(Hello {
                name: "ada".into(),
                count: 5,
            }),
            http::uri::PathAndQuery::from_static("/test.Greeter/SayMany"),
            ClientCodec::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let mut messages = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        messages.push(reply.message);
    }
    assert_eq!(
        messages,
        (0..5).map(|i| format!("ada #{i}")).collect::<Vec<_>>()
    );
    assert!(stream.trailers().await.unwrap().is_some());

    // without a key the gateway refuses before the service sees anything
    client.ready().await.unwrap();
    let refused = client
        .unary(
            tonic::Request::new(Hello::default()),
            say,
            ClientCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
}

/// A gRPC-Web request body: one uncompressed message frame.
fn web_frame(message: &Hello) -> Bytes {
    let encoded = message.encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + encoded.len());
    frame.put_u8(0);
    frame.put_u32(encoded.len() as u32);
    frame.extend_from_slice(&encoded);
    frame.freeze()
}

/// Splits a gRPC-Web response body into its messages and its trailer block.
fn web_frames(mut body: Bytes) -> (Vec<Reply>, String) {
    let mut messages = Vec::new();
    let mut trailers = String::new();
    while body.remaining() >= 5 {
        let flag = body.get_u8();
        let length = body.get_u32() as usize;
        let payload = body.split_to(length);
        if flag & 0x80 != 0 {
            trailers = String::from_utf8(payload.to_vec()).unwrap();
        } else {
            messages.push(Reply::decode(payload).unwrap());
        }
    }
    assert!(body.is_empty(), "no bytes after the frames");
    (messages, trailers)
}

async fn grpc_web_call(
    gateway: &TestGateway,
    method: &str,
    content_type: &str,
    body: Bytes,
    key: Option<&str>,
) -> (u16, http::HeaderMap, Bytes) {
    let mut builder = Request::post(gateway.url(&format!("/test.Greeter/{method}")))
        .header("content-type", content_type)
        .header("x-grpc-web", "1");
    if let Some(key) = key {
        builder = builder.header("x-api-key", key);
    }
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(builder.body(Full::new(body)).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_11);
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

#[tokio::test]
async fn grpc_web_clients_over_http1_reach_the_grpc_service() {
    let gateway = gateway(grpc_upstream().await).await;
    let hello = Hello {
        name: "web".into(),
        count: 3,
    };

    // binary
    let (status, headers, body) = grpc_web_call(
        &gateway,
        "Say",
        "application/grpc-web+proto",
        web_frame(&hello),
        Some("key-alice"),
    )
    .await;
    assert_eq!(status, 200);
    // tonic answers `application/grpc`: translated as it came
    assert_eq!(headers["content-type"], "application/grpc-web");
    let (messages, trailers) = web_frames(body);
    assert_eq!(messages[0].message, "hello web (for alice)");
    assert!(trailers.contains("grpc-status: 0\r\n"), "{trailers:?}");

    // text (base64), server streaming
    let text = base64::engine::general_purpose::STANDARD.encode(web_frame(&hello));
    let (status, headers, body) = grpc_web_call(
        &gateway,
        "SayMany",
        "application/grpc-web-text",
        Bytes::from(text),
        Some("key-alice"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/grpc-web-text");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&body)
        .expect("one base64 stream");
    let (messages, trailers) = web_frames(Bytes::from(decoded));
    let texts: Vec<_> = messages.into_iter().map(|m| m.message).collect();
    assert_eq!(texts, ["web #0", "web #1", "web #2"]);
    assert!(trailers.contains("grpc-status: 0"), "{trailers:?}");

    // an error status reaches the web client (tonic sends it "trailers-only": in the head)
    let (_, headers, body) = grpc_web_call(
        &gateway,
        "Say",
        "application/grpc-web+proto",
        web_frame(&Hello {
            name: "mallory".into(),
            count: 0,
        }),
        Some("key-alice"),
    )
    .await;
    let (messages, trailers) = web_frames(body);
    assert!(messages.is_empty());
    assert!(
        headers.get("grpc-status").is_some_and(|s| s == "7")
            || trailers.contains("grpc-status: 7\r\n"),
        "{headers:?} {trailers:?}"
    );

    // policies apply: no key, no call
    let (status, _, _) = grpc_web_call(
        &gateway,
        "Say",
        "application/grpc-web+proto",
        web_frame(&hello),
        None,
    )
    .await;
    assert_eq!(
        status, 200,
        "gRPC-Web clients read the status from grpc-status"
    );
    assert_eq!(
        headers_of_refusal(&gateway, &hello).await["grpc-status"],
        "16"
    );
    // a text body that is not base64 is the client's error
    let (_, headers, _) = grpc_web_call(
        &gateway,
        "Say",
        "application/grpc-web-text",
        Bytes::from_static(b"!!!not base64!!!"),
        Some("key-alice"),
    )
    .await;
    assert_eq!(headers["grpc-status"], "13");
}

async fn headers_of_refusal(gateway: &TestGateway, hello: &Hello) -> http::HeaderMap {
    let (_, headers, body) = grpc_web_call(
        gateway,
        "Say",
        "application/grpc-web+proto",
        web_frame(hello),
        None,
    )
    .await;
    assert!(body.is_empty(), "trailers-only");
    assert_eq!(headers["content-type"], "application/grpc-web+proto");
    headers
}

#[tokio::test]
async fn grpc_web_needs_an_http2_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.yaml");
    std::fs::write(
        &path,
        "listeners:\n  - name: main\n    bind: 127.0.0.1:0\nupstreams:\n  - name: app\n    targets: [{ url: \"http://127.0.0.1:9\" }]\nroutes:\n  - name: web\n    public: true\n    upstream: app\n    grpc_web: true\n",
    )
    .unwrap();
    let error = portcullis::config::load_file(&path)
        .and_then(|loaded| {
            portcullis::proxy::compile(&loaded, &portcullis::upstream::UpstreamRegistry::new(1), 1)
                .map(|_| ())
        })
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("routes[0].grpc_web: gRPC needs HTTP/2"),
        "{error}"
    );
}
