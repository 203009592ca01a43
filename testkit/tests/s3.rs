//! The S3 server helper against the real `weed`: start, the blocking
//! client's round trip, kill and restart on the same data, the credentials
//! files and the daemon's `[remote]` settings.

use std::time::Instant;

use gpusnapd_testkit::S3Server;

fn toml_table(path: &std::path::Path) -> toml::Table {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{} is not TOML: {e}", path.display()))
}

#[test]
fn a_server_stores_objects_and_keeps_them_across_a_kill_and_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    // A directory that does not exist yet: start makes it.
    let mut server = S3Server::start(&dir.path().join("s3")).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("started in {:?}", started.elapsed());
    assert!(server.is_running());
    assert!(server.endpoint().starts_with("http://127.0.0.1:"));
    assert!(
        server.list_keys("").expect("list").is_empty(),
        "the probe is not left behind"
    );

    server.put("a/b/one", b"first").expect("put one");
    server.put("a/b/two", b"second").expect("put two");
    server.put("a/bc", b"third").expect("put bc");
    server.put("z", b"other").expect("put z");
    assert_eq!(server.get("a/b/one").expect("get"), b"first");
    assert_eq!(
        server.list_keys("a/b").expect("list"),
        ["a/b/one", "a/b/two", "a/bc"],
        "a plain string prefix"
    );
    assert_eq!(
        server.list_keys("a/b/").expect("list"),
        ["a/b/one", "a/b/two"]
    );
    assert_eq!(server.list_keys("a/b/one").expect("list"), ["a/b/one"]);
    assert_eq!(server.list_keys("").expect("list").len(), 4);
    server.put("a/b/one", b"overwritten").expect("overwrite");
    assert_eq!(server.get("a/b/one").expect("get"), b"overwritten");
    server.delete("a/b/two").expect("delete");
    assert!(server.get("a/b/two").is_err(), "deleted");
    assert_eq!(server.list_keys("a/").expect("list"), ["a/b/one", "a/bc"]);
    server
        .delete("never/there")
        .expect("deleting a missing key is fine");

    // More pages than one LIST answer holds (1000 keys).
    for i in 0..1005 {
        server.put(&format!("many/{i:04}"), b"x").expect("put many");
    }
    assert_eq!(server.list_keys("many/").expect("list").len(), 1005);

    server.kill().expect("kill");
    assert!(!server.is_running());
    assert!(
        server.get("a/b/one").is_err(),
        "a killed server answers nothing"
    );
    assert!(matches!(
        server.kill(),
        Err(gpusnapd_testkit::S3Error::NotRunning)
    ));

    let restarted = Instant::now();
    server.restart().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("restarted in {:?}", restarted.elapsed());
    assert!(server.is_running());
    assert_eq!(server.get("a/b/one").expect("kept"), b"overwritten");
    assert_eq!(server.get("a/bc").expect("kept"), b"third");
    server.put("after", b"restart").expect("put after restart");
    assert_eq!(server.get("after").expect("get"), b"restart");
    assert!(server.log_tail(5).lines().count() <= 5);
    assert!(!server.log_tail(5).is_empty(), "weed logs");
}

#[test]
fn credentials_files_and_remote_settings_name_this_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = S3Server::start(dir.path()).unwrap_or_else(|e| panic!("{e}"));

    let right = toml_table(server.credentials_file());
    assert_eq!(right["access_key_id"].as_str(), Some(server.access_key()));
    assert_eq!(
        right["secret_access_key"].as_str(),
        Some(server.secret_key())
    );
    let wrong_path = server.wrong_credentials_file();
    assert_ne!(wrong_path, server.credentials_file());
    let wrong = toml_table(&wrong_path);
    assert_eq!(wrong["access_key_id"], right["access_key_id"]);
    assert_ne!(wrong["secret_access_key"], right["secret_access_key"]);

    let settings = server.remote_settings("pre/fix");
    let table: toml::Table = settings
        .iter()
        .map(|(key, value)| format!("{key} = {value}\n"))
        .collect::<String>()
        .parse()
        .expect("TOML values");
    assert_eq!(table["enabled"].as_bool(), Some(true));
    assert_eq!(table["endpoint"].as_str(), Some(server.endpoint().as_str()));
    assert_eq!(table["bucket"].as_str(), Some(S3Server::BUCKET));
    assert_eq!(table["prefix"].as_str(), Some("pre/fix"));
    assert_eq!(table["region"].as_str(), Some("us-east-1"));
    assert_eq!(
        table["credentials_file"].as_str(),
        server.credentials_file().to_str()
    );
    assert_eq!(table["request_timeout_s"].as_integer(), Some(5));
    assert_eq!(table["retry_deadline_s"].as_integer(), Some(30));
    assert_eq!(table["part_bytes"].as_integer(), Some(5 << 20));
    assert_eq!(table["concurrency"].as_integer(), Some(4));

    // A bucket made later works too, and making it twice is fine.
    server.create_bucket("second").expect("create");
    server.create_bucket("second").expect("create again");
}
