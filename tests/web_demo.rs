//! The web demo's files, served by the all-in-one server over real HTTP
//! (the browser scenarios are in `web_e2e.rs`).

mod common;

use common::TestServer;

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

#[tokio::test]
async fn the_demo_is_served_at_demo_and_the_root_leads_there() {
    let server = TestServer::start().await;
    let http = no_redirects();

    for path in ["/", "/demo"] {
        let r = http.get(format!("{}{path}", server.base)).send().await.expect("GET");
        assert!(r.status().is_redirection(), "{path}: {}", r.status());
        assert_eq!(r.headers()["location"], "/demo/", "{path}");
    }

    let r = http.get(format!("{}/demo/", server.base)).send().await.expect("GET");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let html = r.text().await.expect("body");
    assert!(html.contains(r#"<script type="module" src="app.js">"#), "{html}");

    for (file, kind, marker) in [
        ("app.js", "text/javascript; charset=utf-8", "syncLoop"),
        ("call.js", "text/javascript; charset=utf-8", "m.call.select_answer"),
        ("matrix.js", "text/javascript; charset=utf-8", "/voip/turnServer"),
        ("stats.js", "text/javascript; charset=utf-8", "getStats"),
        ("style.css", "text/css; charset=utf-8", ".tiles"),
        ("favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let r = http
            .get(format!("{}/demo/{file}", server.base))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "{file}");
        assert_eq!(r.headers()["content-type"], kind, "{file}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{file}");
        assert!(r.text().await.expect("body").contains(marker), "{file}");
    }

    for missing in ["/demo/nope.js", "/demo/..%2FCargo.toml", "/demo/app.js/x"] {
        let r = http.get(format!("{}{missing}", server.base)).send().await.expect("GET");
        assert_eq!(r.status(), 404, "{missing}");
    }

    // The Matrix API still answers its own unknown paths the Matrix way.
    let r = http
        .get(format!("{}/_matrix/client/v3/nope", server.base))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["errcode"],
        "M_UNRECOGNIZED"
    );

    let urls = server.running.urls();
    assert_eq!(
        urls[0].1,
        format!("{}/demo/", server.running.base_url),
        "the demo URL is printed first"
    );
}
