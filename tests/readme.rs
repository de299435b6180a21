//! The configuration examples in README.md are valid, exactly as printed.

use std::path::Path;

fn toml_blocks(readme: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in readme.lines() {
        match (&mut cur, line.trim_start()) {
            (None, "```toml") => cur = Some(String::new()),
            (Some(_), "```") => out.extend(cur.take()),
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            _ => {}
        }
    }
    out
}

/// A site example with its `release` pointing at `link`.
fn with_release(example: &str, link: &Path) -> String {
    example
        .lines()
        .map(|l| {
            if l.starts_with("release") {
                format!("release = \"{}\"", link.display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn readme_config_examples_are_valid() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let blocks = toml_blocks(&readme);
    let agent = blocks
        .iter()
        .find(|b| b.starts_with("# hatchery.toml"))
        .expect("an agent example");
    let site = blocks
        .iter()
        .find(|b| b.starts_with("# sites.d/blog.toml"))
        .expect("a site example");
    let shop = blocks
        .iter()
        .find(|b| b.starts_with("# sites.d/shop.toml"))
        .expect("a limits example");

    let wiki = blocks
        .iter()
        .find(|b| b.starts_with("# sites.d/wiki.toml"))
        .expect("a sandbox example");

    let dir = tempfile::tempdir().expect("tempdir");
    let sites = dir.path().join("sites.d");
    std::fs::create_dir_all(&sites).expect("mkdir");
    std::fs::write(sites.join("blog.toml"), site).expect("write");
    std::fs::write(sites.join("shop.toml"), shop).expect("write");
    std::fs::write(sites.join("wiki.toml"), wiki).expect("write");
    // The example's paths are real system paths; point sites_dir at our copy.
    let agent_text: String = agent
        .lines()
        .map(|l| {
            if l.starts_with("sites_dir") {
                format!("sites_dir = \"{}\"", sites.display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let agent_path = dir.path().join("hatchery.toml");
    std::fs::write(&agent_path, agent_text).expect("write");
    let config = hatchery::config::load(&agent_path).expect("the README examples are valid");
    assert_eq!(config.sites.len(), 3);

    // The deploy example, with its release symlink pointing at a real directory here.
    let app = blocks
        .iter()
        .find(|b| b.starts_with("# sites.d/app.toml"))
        .expect("a deploy example");
    let release = dir.path().join("releases/42");
    std::fs::create_dir_all(&release).expect("mkdir");
    let link = dir.path().join("current");
    std::os::unix::fs::symlink(&release, &link).expect("symlink");
    let app_text = with_release(app, &link);
    std::fs::write(sites.join("app.toml"), &app_text).expect("write");
    let config = hatchery::config::load(&agent_path).expect("the deploy example is valid");
    let app = &config.sites[0];
    assert_eq!(app.name.as_str(), "app");
    assert_eq!(app.deploy.probation, std::time::Duration::from_secs(2));
    let target = std::fs::canonicalize(&release).expect("canonical");
    let run = app.for_release(&target);
    assert_eq!(run.command[2], target.display().to_string());
    assert_eq!(run.workdir.as_deref(), Some(target.as_path()));
    assert_eq!(app.deploy.canary_abort_crashes, 1, "the default");
    // The zygote-mode example, with its release pointing at the same directory.
    let store = blocks
        .iter()
        .find(|b| b.starts_with("# sites.d/store.toml (zygote)"))
        .expect("a zygote example");
    let store_text = with_release(store, &link);
    std::fs::write(sites.join("store.toml"), &store_text).expect("write");
    let config = hatchery::config::load(&agent_path).expect("the zygote example is valid");
    let store = config
        .sites
        .iter()
        .find(|s| s.name.as_str() == "store")
        .expect("store");
    assert_eq!(store.mode, hatchery::config::SiteMode::Zygote);
    std::fs::remove_file(sites.join("store.toml")).expect("rm");
    // The canary example continues the deploy example.
    let canary = blocks
        .iter()
        .find(|b| b.starts_with("# sites.d/app.toml (continued)"))
        .expect("a canary example");
    std::fs::write(sites.join("app.toml"), format!("{app_text}\n{canary}")).expect("write");
    let config = hatchery::config::load(&agent_path).expect("the canary example is valid");
    assert_eq!(config.sites[0].deploy.canary_abort_crashes, 3);
    // So does the warm-up example.
    let warm = blocks
        .iter()
        .find(|b| b.starts_with("# sites.d/app.toml (warm-up)"))
        .expect("a warm-up example");
    // Its keys go in the deploy example's [deploy] table, its last.
    assert!(app_text.contains("[deploy]\nprobation"), "{app_text}");
    let keys: Vec<&str> = warm
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .collect();
    let with_warmup = format!("{app_text}\n{}\n", keys.join("\n"));
    std::fs::write(sites.join("app.toml"), &with_warmup).expect("write");
    let config = hatchery::config::load(&agent_path).expect("the warm-up example is valid");
    let paths: Vec<&str> = config.sites[0]
        .warmup
        .iter()
        .map(|w| w.path.as_str())
        .collect();
    assert_eq!(paths, ["/", "/search?q=warm"]);
    // So does the health example.
    let health = blocks
        .iter()
        .find(|b| b.starts_with("# sites.d/app.toml (health)"))
        .expect("a health example");
    std::fs::write(sites.join("app.toml"), format!("{app_text}\n{health}")).expect("write");
    let config = hatchery::config::load(&agent_path).expect("the health example is valid");
    let h = config.sites[0].health.as_ref().expect("health");
    assert_eq!((h.failures, h.http.path.as_str()), (2, "/health"));
    assert_eq!(h.interval, std::time::Duration::from_secs(10));
    std::fs::remove_file(sites.join("app.toml")).expect("rm");

    // The server that binds its own port.
    let files = blocks
        .iter()
        .find(|b| b.starts_with("# sites.d/files.toml"))
        .expect("an own-port example");
    std::fs::write(sites.join("files.toml"), files).expect("write");
    let config = hatchery::config::load(&agent_path).expect("the own-port example is valid");
    let files = config
        .sites
        .iter()
        .find(|s| s.name.as_str() == "files")
        .expect("files");
    assert_eq!(files.listen[0].mode, hatchery::config::ListenMode::Own);
    assert_eq!(files.agent_listeners().count(), 0);
    assert!(files.exclusive_deploys());
    assert_eq!(files.ready.check, hatchery::config::ReadyCheck::Http);
    std::fs::remove_file(sites.join("files.toml")).expect("rm");
    let config = hatchery::config::load(&agent_path).expect("valid");
    assert_eq!(config.sites.len(), 3);
    let blog = &config.sites[0];
    let shop = &config.sites[1];
    let wiki = &config.sites[2];
    assert_eq!(
        wiki.sandbox.root.as_deref(),
        Some(Path::new("/srv/wiki/root"))
    );
    assert_eq!(wiki.sandbox.capabilities, vec![10]);
    assert_eq!(wiki.sandbox.connect, vec![5432]);
    assert_eq!(
        wiki.sandbox.landlock_fs,
        hatchery::config::sandbox::Mode::Required
    );
    assert!(wiki.sandbox.private_tmp);
    assert!(
        wiki.sandbox
            .rlimits
            .iter()
            .any(|(n, _, v)| n == "as" && *v == 2 << 30)
    );
    assert_eq!(
        shop.auto.map(|a| (a.min, a.max, a.by_load())),
        Some((1, 16, false))
    );
    assert_eq!(shop.limits.memory, Some(512 << 20));
    assert_eq!(shop.limits.pids_max, Some(256));
    assert_eq!(blog.workers, 4);
    assert_eq!(blog.ready.check, hatchery::config::ReadyCheck::Notify);
    assert_eq!(blog.restart.flapping_exits, 5);
    assert_eq!(
        config.control_socket,
        Path::new("/run/hatchery/control.sock")
    );
}

#[test]
fn readme_load_scaling_example_is_valid() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let blocks = toml_blocks(&readme);
    let api = blocks
        .iter()
        .find(|b| b.starts_with("# sites.d/api.toml"))
        .expect("a load scaling example");
    let raw: hatchery::config::RawSite = toml::from_str(api).expect("toml");
    let s = hatchery::config::validate_site(
        Path::new("/etc/hatchery/sites.d/api.toml"),
        &raw,
        hatchery::config::LogPolicy::default(),
    )
    .expect("the load scaling example is valid");
    let auto = s.auto.expect("automatic");
    assert!(auto.by_load());
    assert_eq!((auto.min, auto.max), (1, 24));
    assert_eq!(auto.scale.target_percent, 70);
    assert_eq!(auto.scale.interval, std::time::Duration::from_millis(250));
    assert_eq!(
        auto.scale.shrink_cooldown,
        std::time::Duration::from_secs(30)
    );
    // What it spells out are the defaults.
    let defaults = hatchery::config::ScalePolicy {
        by: hatchery::config::ScaleBy::Load,
        ..hatchery::config::ScalePolicy::DEFAULT
    };
    assert_eq!(auto.scale, defaults);
}

#[test]
fn the_install_sections_site_is_valid_with_the_packaged_configuration() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    let blocks = toml_blocks(&readme);
    let site = blocks
        .iter()
        .find(|b| b.starts_with("# /etc/hatchery/sites.d/blog.toml"))
        .expect("the install section's site");
    let packaged =
        std::fs::read_to_string(root.join("packaging/hatchery.toml")).expect("packaged config");
    let dir = tempfile::tempdir().expect("tempdir");
    let sites = dir.path().join("sites.d");
    std::fs::create_dir_all(&sites).expect("mkdir");
    std::fs::write(sites.join("blog.toml"), site).expect("write");
    // The packaged file's paths are the host's; point them into the test's directory.
    let agent_text: String = packaged
        .lines()
        .map(|l| match l.split_once(" = ") {
            Some(("sites_dir", _)) => format!("sites_dir = \"{}\"", sites.display()),
            Some(("state_dir", _)) => format!("state_dir = \"{}\"", dir.path().display()),
            Some(("control_socket", _)) => {
                format!("control_socket = \"{}/control.sock\"", dir.path().display())
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(agent_text, packaged, "the packaged file names no paths");
    let agent_path = dir.path().join("hatchery.toml");
    std::fs::write(&agent_path, agent_text).expect("write");
    let config = hatchery::config::load(&agent_path).expect("the install example is valid");
    assert_eq!(config.sites.len(), 1);
    assert_eq!(config.sites[0].name.as_str(), "blog");
}

/// The block of README.md (of any language) whose first line is `first`.
fn block_starting(readme: &str, first: &str) -> Option<String> {
    let mut lines = readme.lines();
    while let Some(l) = lines.next() {
        if l.starts_with("```") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            if body.first() == Some(&first) {
                return Some(body.join("\n") + "\n");
            }
        }
    }
    None
}

#[test]
fn readme_env_file_and_stop_sequence_example_is_valid() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let site = block_starting(&readme, "# sites.d/mail.toml").expect("an env_file example");
    let env = block_starting(&readme, "# sites.d/mail.env").expect("its environment file");
    let dir = tempfile::tempdir().expect("tempdir");
    let sites = dir.path().join("sites.d");
    std::fs::create_dir(&sites).expect("mkdir");
    std::fs::write(sites.join("mail.toml"), &site).expect("write");
    std::fs::write(sites.join("mail.env"), &env).expect("write");
    let agent = dir.path().join("hatchery.toml");
    std::fs::write(&agent, "sites_dir = \"sites.d\"\n").expect("write");
    let config = hatchery::config::load(&agent).expect("the env_file example is valid");
    let mail = &config.sites[0];
    let vars: Vec<(&str, &str)> = mail
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        vars,
        [
            ("MAIL_DB", "postgres://db/mail"),
            ("MAIL_FROM", "noreply@example.com"),
            ("MAIL_GREETING", "Hello, $USER"),
            ("MAIL_MODE", "production"),
        ]
    );
    let signals: Vec<String> = mail.stop.signals().map(|s| s.name()).collect();
    assert_eq!(signals, ["SIGHUP", "SIGTERM"]);
    assert_eq!(mail.stop.timeout, std::time::Duration::from_secs(10));
    // The error the table shows for a bad line is the one given.
    std::fs::write(sites.join("mail.env"), format!("{env}oops\n")).expect("write");
    let e = hatchery::config::load(&agent).expect_err("a bad line");
    assert_eq!(
        e.one(),
        format!(
            "{}:{}: env_file: expected NAME=VALUE, found \"oops\"",
            sites.join("mail.env").display(),
            env.lines().count() + 1
        )
    );
    assert!(readme.contains("mail.env:6: env_file: expected NAME=VALUE, found \"oops\""));
}
