//! The CLI never panics on bad input: credentials no header can carry, endpoints that are
//! not URLs or not listening, odd identifiers. Each gets a clear error and exit status 1
//! (a panic exits with 101 and prints "panicked"). No daemon is needed: every case fails
//! before a request is answered.

use std::process::Command;

fn hearth(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hearth"));
    c.args(args).env_remove("AWS_ACCESS_KEY_ID").env_remove("AWS_SECRET_ACCESS_KEY").env_remove("HEARTH_ENDPOINT");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run hearth");
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn bad_client_input_is_an_error_never_a_panic() {
    // A closed port: nothing answers there.
    let endpoint = "http://127.0.0.1:1";
    let key = [("AWS_SECRET_ACCESS_KEY", "secret"), ("HEARTH_ENDPOINT", endpoint)];
    // (arguments, environment, what stderr must say)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["ls"], vec![("AWS_ACCESS_KEY_ID", "AKIDHEARTH\n")], "access key id holds a character"),
        (vec!["get", "mvm-x"], vec![("AWS_ACCESS_KEY_ID", "AK\rID")], "access key id holds a character"),
        (vec!["ls"], vec![("AWS_ACCESS_KEY_ID", "AKID\u{7f}")], "access key id holds a character"),
        (vec!["ls"], vec![("AWS_ACCESS_KEY_ID", "AKID")], "cannot reach the Hearth API"),
        (vec!["ls", "--endpoint", "not a url"], vec![("AWS_ACCESS_KEY_ID", "AKID")], "InvalidUrl"),
        (vec!["ls", "--endpoint", "http://[::1"], vec![("AWS_ACCESS_KEY_ID", "AKID")], "InvalidUrl"),
        (vec!["get", "../../etc\npasswd"], vec![("AWS_ACCESS_KEY_ID", "AKID")], ""),
        (vec!["ls"], vec![], "no access key"),
    ];
    for (args, env, want) in cases {
        let mut all = key.to_vec();
        all.extend(env.iter().copied());
        let (code, err) = hearth(&args, &all);
        assert!(!err.contains("panicked"), "hearth {args:?} with {env:?} panicked: {err}");
        assert_eq!(code, 1, "hearth {args:?} with {env:?}: exit {code}: {err}");
        assert!(err.contains(want), "hearth {args:?} with {env:?}: {err:?} does not say {want:?}");
    }
}
