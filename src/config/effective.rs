//! The effective configuration `hatchery check` prints: each file as validation read it,
//! every default it took written in.

use super::{AgentConfig, RawAgent, RawSite, format_size};

/// The site file a [`SiteConfig`](super::SiteConfig) was validated from, with every key the file left out
/// written in with the default validation took: the effective configuration `check`
/// prints. [`validate_site`](super::validate_site) writes each default in where it applies it, so there is no
/// second description of the defaults to keep in step, and validating this file again
/// gives the same configuration. (Where the file names no `user` or `group`, this one
/// names the agent's own, in numbers; validated again, `user` and `group` then say so.)
///
/// It is what the file says, not what a derived configuration runs: it keeps `{release}`
/// after [`SiteConfig::for_release`](super::SiteConfig::for_release).
///
/// It takes no part in comparing configurations: two are equal when they mean the same,
/// however their files spell it (`"30s"` or `"30000ms"`), which is what a reload compares.
#[derive(Debug, Clone)]
pub struct Effective(pub(super) RawSite);

impl Effective {
    /// The file, in the file format.
    pub fn raw(&self) -> &RawSite {
        &self.0
    }
}

impl PartialEq for Effective {
    fn eq(&self, _: &Effective) -> bool {
        true
    }
}

impl Eq for Effective {}

impl AgentConfig {
    /// The effective configuration as TOML: the agent file, then each site.
    pub fn effective_toml(&self) -> String {
        let agent = RawAgent {
            control_socket: Some(self.control_socket.clone()),
            state_dir: Some(self.state_dir.clone()),
            sites_dir: Some(self.sites_dir.clone()),
            cgroup_base: Some(self.cgroup_base.to_string()),
            logs: None,
            memory_reserve: Some(format_size(self.memory_reserve)),
            metrics: self.metrics.map(|a| a.to_string()),
        };
        let mut out = format!("# {}\n", self.file.display());
        out.push_str(&toml::to_string(&agent).unwrap_or_default());
        for site in &self.sites {
            out.push_str(&format!("\n# {}\n", site.file.display()));
            out.push_str(&toml::to_string(site.effective.raw()).unwrap_or_default());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_site as site;
    use super::super::{Signal, SiteConfig};

    #[test]
    fn effective_config_round_trips() {
        let s = site("name = \"blog\"\ncommand = [\"/bin/sleep\", \"1\"]\n[[listen]]\nunix = \"/run/blog.sock\"\n").expect("valid");
        let text = toml::to_string(s.effective.raw()).expect("serialize");
        let again = site(&text).expect("the effective config parses");
        // The effective file names the resolved uid and gid where the original said nothing.
        assert_eq!(again.user.as_deref(), Some(s.uid.to_string().as_str()));
        assert_eq!(
            SiteConfig {
                user: None,
                group: None,
                ..again
            },
            s
        );
    }

    #[test]
    fn the_effective_file_names_every_default() {
        let s = site("name = \"blog\"\ncommand = [\"/bin/true\"]\n").expect("valid");
        let text = toml::to_string(s.effective.raw()).expect("serialize");
        let want = format!(
            r#"name = "blog"
command = ["/bin/true"]
mode = "exec"
output = "pipe"
workers = 1
user = "{uid}"
group = "{gid}"

[stop]
signal = "SIGTERM"
timeout = "30s"

[restart]
backoff_initial = "100ms"
backoff_max = "30s"
healthy_after = "1m"

[restart.flapping]
exits = 5
within = "10s"

[ready]
check = "none"
timeout = "30s"
settle = "1s"

[deploy]
probation = "1s"

[deploy.canary_abort]
crashes = 1

[logs]
max_size = "10M"
keep = 3

[sandbox]
strict = true
groups = []
capabilities = []
private_tmp = false

[sandbox.rlimits]

[sandbox.landlock]
filesystem = "best-effort"
network = "best-effort"
scope = "best-effort"
read_only = ["/"]
read_write = ["/tmp", "/dev/null"]
execute = ["/"]
connect = []
"#,
            uid = s.uid,
            gid = s.gid
        );
        assert_eq!(text, want);

        // And no key is left out but those that have no default (so a key added to the
        // file format fails here until validation writes its default in, or it is listed).
        fn unset(v: &serde_json::Value, path: &str, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Null => out.push(path.to_string()),
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        unset(v, &format!("{path}.{k}"), out);
                    }
                }
                _ => {}
            }
        }
        let mut left_out = Vec::new();
        unset(
            &serde_json::to_value(s.effective.raw()).expect("json"),
            "",
            &mut left_out,
        );
        left_out.sort();
        assert_eq!(
            left_out,
            [
                ".cpu_weight",
                ".deploy.warmup",
                ".health",
                ".memory",
                ".memory_high",
                ".memory_max",
                ".pids_max",
                ".ready.host",
                ".ready.path",
                ".ready.status",
                ".release",
                ".sandbox.root",
                ".scale",
                ".workdir",
                ".worker_memory",
                ".workers_max",
                ".workers_min",
            ]
        );
    }

    #[test]
    fn the_effective_file_validates_to_the_same_configuration() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("r1")).expect("mkdir");
        let link = dir.path().join("current");
        std::os::unix::fs::symlink(dir.path().join("r1"), &link).expect("symlink");
        // Most keys, some written (spelled as a user might: a signal by number, a size in
        // MiB, an rlimit "unlimited", a backlog out of range) and the rest left out.
        let text = format!(
            r#"
name = "blog"
command = ["{{release}}/bin/server", "--port", "8000"]
workers = "auto"
workers_max = 8
worker_memory = "100M"
user = "0"
group = "0"
workdir = "{{release}}"
release = "{}"
memory = "1G"
pids_max = 256
cpu_weight = 200
memory_max = "256MiB"
memory_high = "200M"
[env]
APP_CONFIG = "{{release}}/app.ini"
[[listen]]
name = "http"
tcp = "127.0.0.1:8000"
[[listen]]
unix = "/run/blog/admin.sock"
backlog = 100000
[stop]
signal = "40"
timeout = "1.5s"
[restart]
backoff_initial = "250ms"
flapping = {{ exits = 3 }}
[ready]
check = "tcp"
timeout = "1m"
[scale]
by = "load"
target = "80%"
[logs]
keep = 5
[sandbox]
root = "/srv/blog"
strict = false
groups = ["0"]
capabilities = ["net_bind_service"]
private_tmp = true
[sandbox.rlimits]
nofile = 1024
core = "unlimited"
as = "1G"
[sandbox.landlock]
network = "required"
connect = [5432]
read_write = ["/tmp", "/var/lib/blog"]
"#,
            link.display()
        );
        let s = site(&text).expect("valid");
        let kept = s.effective.raw();
        let again =
            site(&toml::to_string(kept).expect("serialize")).expect("the kept file is valid");
        assert_eq!(again, s);
        assert_eq!(
            again.effective.raw(),
            kept,
            "validating it again fills in nothing more"
        );
        // Written values are kept as written; defaults are written in; a clamped value says
        // what is used.
        assert_eq!(
            kept.stop.as_ref().and_then(|s| s.signal.as_deref()),
            Some("40")
        );
        assert_eq!(s.stop.signal, Signal(40));
        assert_eq!(kept.memory_max.as_deref(), Some("256MiB"));
        let restart = kept.restart.as_ref().expect("restart");
        assert_eq!(restart.backoff_max.as_deref(), Some("30s"));
        assert_eq!(
            restart.flapping.as_ref().and_then(|f| f.within.as_deref()),
            Some("10s")
        );
        assert_eq!(kept.listen[1].name.as_deref(), Some("listen1"));
        assert_eq!(kept.listen[1].backlog, Some(65535));
        assert_eq!(kept.workers_min, Some(1));
        let scale = kept.scale.as_ref().expect("scale");
        assert_eq!(scale.shrink_cooldown.as_deref(), Some("30s"));
        assert_eq!(s.auto.map(|a| a.scale.target_percent), Some(80));
        let sandbox = kept.sandbox.as_ref().expect("sandbox");
        assert_eq!(
            sandbox.rlimits.as_ref().and_then(|r| r.get("core")),
            Some(&super::super::sandbox::RawLimit::Text("unlimited".into()))
        );
        assert_eq!(
            sandbox.landlock.as_ref().and_then(|l| l.scope.as_deref()),
            Some("best-effort")
        );
    }
}
