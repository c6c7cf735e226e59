//! The origin rule in a real browser (`tests/api/test_browser.py`): headless Chromium
//! loads a page from a microvm's endpoint over TLS, with the daemon's CA trusted, and the
//! page's JavaScript fails to read the API, the API host's cookie and another microvm's
//! endpoint, while reading its own origin (the control); then the same page through the
//! path form. Needs `chromium` and `certutil` (scripts/setup-host.sh installs them) and
//! root, as every VM test does (the browser gets a network namespace of its own).

mod daemon;

use daemon::*;

/// The app's `cgi-bin/cookie`: answers with the `Cookie` header it got, and sets a cookie.
const COOKIE_CGI: &str = "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\nSet-Cookie: app=1; Path=/\\r\\n\\r\\n%s' \"$HTTP_COOKIE\"\n";

#[test]
fn a_page_on_an_endpoint_cannot_read_the_api_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (key(&state), key(&state));
    let ctx = tmp.path().join("ctx");
    let www = ctx.join("page/www");
    std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
    std::fs::write(
        ctx.join("page/Dockerfile"),
        "FROM minimal\nCOPY www /www\nRUN chmod 755 /www/cgi-bin/cookie\nCMD busybox httpd -f -p 8080 -h /www\n",
    )
    .unwrap();
    std::fs::write(www.join("index.html"), include_str!("api/origin_page.html")).unwrap();
    std::fs::write(www.join("ready"), "ok\n").unwrap();
    std::fs::write(www.join("cgi-bin/cookie"), COOKIE_CGI).unwrap();
    allow_artifacts(&state, &a, &ctx);
    let browser = tmp.path().join("browser");
    std::fs::create_dir_all(&browser).unwrap();
    let _microvms = Microvms(state.clone());
    let daemon = Daemon::start(&state);
    let env = [("HEARTH_CTX_PAGE", ctx.join("page").display().to_string()), ("HEARTH_BROWSER_TMP", browser.display().to_string())];
    let out = run_script("test_browser.py", &daemon.1, (&a, &b), &ctx, &state, &[], &env);
    assert!(out.contains("browser origin rule: ok"), "{out}");
    // What the page and Chromium found (shown with --nocapture).
    println!("{out}");
    drop(daemon);
}
