//! Where credentials, region and endpoint come from: environment variables, then the
//! profile of the shared credentials and config files (README.md, "Configuration").

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

use crate::{Error, Location, Result, S3Object, S3Upload, PART_SIZE};

/// S3's smallest part (but the last).
const MIN_PART: usize = 5 << 20;
/// S3's most parts of one upload.
const MAX_PARTS: u64 = 10_000;

#[derive(Clone)]
struct Credentials {
    key_id: String,
    secret: String,
    token: Option<String>,
}

/// How to reach S3: credentials, region, endpoint, retries. Made by [`Config::from_env`],
/// adjusted by the `with_` methods. Its `Debug` shows the access key ID, never the secret.
#[derive(Clone)]
pub struct Config {
    credentials: Option<Credentials>,
    /// Where the credentials came from, for messages.
    source: String,
    region: String,
    endpoint: Option<String>,
    max_retries: usize,
    retry_timeout: Duration,
    part_size: usize,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("credentials", &self.describe_credentials())
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("max_retries", &self.max_retries)
            .field("retry_timeout", &self.retry_timeout)
            .field("part_size", &self.part_size)
            .finish()
    }
}

/// One profile's keys, from one file.
struct Profile {
    file: PathBuf,
    section: String,
    keys: Vec<(String, String)>,
}

impl Profile {
    fn get(&self, key: &str) -> Option<String> {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    }
}

/// Reads `[section]` (the first of `sections` present) of an INI file. A missing file is
/// no profile unless `required`.
fn load_profile(file: &Path, sections: &[String], required: bool) -> Result<Option<Profile>> {
    if !file.exists() {
        if required {
            return Err(Error::Config(format!("{}: no such file", file.display())));
        }
        return Ok(None);
    }
    let ini = ini::Ini::load_from_file(file)
        .map_err(|e| Error::Config(format!("{}: {e}", file.display())))?;
    for name in sections {
        if let Some(props) = ini.section(Some(name.as_str())) {
            return Ok(Some(Profile {
                file: file.to_path_buf(),
                section: name.clone(),
                keys: props
                    .iter()
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect(),
            }));
        }
    }
    Ok(None)
}

impl Config {
    /// The configuration of this process's environment: environment variables first, then
    /// the profile (`AWS_PROFILE`, else `default`) of the shared credentials file
    /// (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`) and of the config file
    /// (`AWS_CONFIG_FILE`, else `~/.aws/config`). Credentials missing everywhere are an
    /// error only when an object is opened or created.
    pub fn from_env() -> Result<Config> {
        Config::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// [`Config::from_env`] with the variables from `var` instead of the environment.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let home = var("HOME").map(PathBuf::from);
        let aws_file = |env: &str, name: &str| -> Result<(PathBuf, bool)> {
            match var(env) {
                Some(p) => Ok((PathBuf::from(p), true)),
                None => match &home {
                    Some(h) => Ok((h.join(".aws").join(name), false)),
                    None => Ok((PathBuf::from("/nonexistent/.aws").join(name), false)),
                },
            }
        };
        let explicit_profile = var("AWS_PROFILE");
        let profile = explicit_profile.clone().unwrap_or_else(|| "default".into());
        let (cred_path, cred_required) = aws_file("AWS_SHARED_CREDENTIALS_FILE", "credentials")?;
        let (conf_path, conf_required) = aws_file("AWS_CONFIG_FILE", "config")?;
        let cred_file = load_profile(&cred_path, std::slice::from_ref(&profile), cred_required)?;
        let mut conf_sections = vec![format!("profile {profile}")];
        if profile == "default" {
            conf_sections.push("default".into());
        }
        let conf_file = load_profile(&conf_path, &conf_sections, conf_required)?;
        if explicit_profile.is_some() && cred_file.is_none() && conf_file.is_none() {
            return Err(Error::Config(format!(
                "AWS_PROFILE={profile}: no such profile in {} or {}",
                cred_path.display(),
                conf_path.display()
            )));
        }
        let profiles: Vec<&Profile> = [cred_file.as_ref(), conf_file.as_ref()]
            .into_iter()
            .flatten()
            .collect();
        let from_profiles = |key: &str| profiles.iter().find_map(|p| p.get(key));

        let (credentials, source) = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(key_id), Some(secret)) => (
                Some(Credentials {
                    key_id,
                    secret,
                    token: var("AWS_SESSION_TOKEN"),
                }),
                "environment variables AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY".to_string(),
            ),
            _ => {
                let found = profiles.iter().find_map(|p| {
                    Some((
                        p,
                        Credentials {
                            key_id: p.get("aws_access_key_id")?,
                            secret: p.get("aws_secret_access_key")?,
                            token: p.get("aws_session_token"),
                        },
                    ))
                });
                match found {
                    Some((p, c)) => (
                        Some(c),
                        format!("profile [{}] of {}", p.section, p.file.display()),
                    ),
                    None => (
                        None,
                        format!(
                            "no credentials (neither AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY nor \
                             aws_access_key_id/aws_secret_access_key in profile `{profile}` of {} or {})",
                            cred_path.display(),
                            conf_path.display()
                        ),
                    ),
                }
            }
        };
        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .or_else(|| from_profiles("region"))
            .unwrap_or_else(|| "us-east-1".into());
        let endpoint = var("AWS_ENDPOINT_URL_S3")
            .or_else(|| var("AWS_ENDPOINT_URL"))
            .or_else(|| from_profiles("endpoint_url"));
        Config {
            credentials,
            source,
            region,
            endpoint,
            max_retries: 10,
            retry_timeout: Duration::from_secs(180),
            part_size: PART_SIZE,
        }
        .check_endpoint()
    }

    fn check_endpoint(self) -> Result<Config> {
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(Error::Config(format!(
                    "endpoint `{e}` is not an http:// or https:// URL"
                )));
            }
        }
        Ok(self)
    }

    /// Uses this endpoint (`https://…`, or `http://…` which is then allowed) with
    /// path-style addressing (`ENDPOINT/BUCKET/KEY`), as S3-compatible servers want.
    pub fn with_endpoint(mut self, url: impl Into<String>) -> Config {
        self.endpoint = Some(url.into().trim_end_matches('/').to_string());
        self
    }

    /// Uses these credentials instead of those found by [`Config::from_env`].
    pub fn with_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
    ) -> Config {
        self.credentials = Some(Credentials {
            key_id: access_key_id.into(),
            secret: secret_access_key.into(),
            token: session_token,
        });
        self.source = "credentials given to Config::with_credentials".into();
        self
    }

    /// Uses this region (default: `AWS_REGION`, the profile's, else `us-east-1`).
    pub fn with_region(mut self, region: impl Into<String>) -> Config {
        self.region = region.into();
        self
    }

    /// Retries a failed request (connection errors, 5xx, throttling) at most
    /// `max_retries` times with exponential backoff, and not after `timeout` from its
    /// first try (defaults: 10 retries, 180 s). One request never waits longer than
    /// `timeout` for an answer either.
    pub fn with_retries(mut self, max_retries: usize, timeout: Duration) -> Config {
        self.max_retries = max_retries;
        self.retry_timeout = timeout;
        self
    }

    /// Uploads in parts of `bytes` (at least S3's 5 MiB; default [`PART_SIZE`]).
    pub fn with_part_size(mut self, bytes: usize) -> Config {
        self.part_size = bytes.max(MIN_PART);
        self
    }

    /// The part size of uploads.
    pub fn part_size(&self) -> usize {
        self.part_size
    }

    /// How long a request is retried (see [`Config::with_retries`]).
    pub fn retry_timeout(&self) -> Duration {
        self.retry_timeout
    }

    /// The region requests are signed for.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The custom endpoint, if any.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Where the credentials came from and their access key ID (never the secret).
    pub fn describe_credentials(&self) -> String {
        match &self.credentials {
            Some(c) => format!("access key ID {} from {}", c.key_id, self.source),
            None => self.source.clone(),
        }
    }

    /// Opens an object for positional reads: one HEAD, for its size and ETag.
    pub fn open(&self, at: &Location) -> Result<S3Object> {
        S3Object::open(self, at)
    }

    /// Starts a multipart upload to `at`; the object appears only at
    /// [`S3Upload::finish`].
    pub fn create(&self, at: &Location) -> Result<S3Upload> {
        S3Upload::start(self, at, self.part_size)
    }

    /// [`Config::create`] for an object of about `size_hint` bytes: the part size grows
    /// (in MiB steps) from the configured one so that the object fits in 9,000 parts,
    /// leaving room for a hint that was a little short.
    pub fn create_sized(&self, at: &Location, size_hint: u64) -> Result<S3Upload> {
        let part = usize::try_from(part_size_for(self.part_size, size_hint))
            .map_err(|_| Error::Config(format!("{at}: {size_hint} bytes is too large")))?;
        S3Upload::start(self, at, part)
    }

    /// The store of one bucket.
    pub(crate) fn store(&self, at: &Location) -> Result<Arc<AmazonS3>> {
        let c = self
            .credentials
            .as_ref()
            .ok_or_else(|| Error::Config(format!("{at}: {}", self.source)))?;
        let backoff = BackoffConfig {
            init_backoff: Duration::from_millis(100).min(self.retry_timeout / 10),
            max_backoff: Duration::from_secs(15).min(self.retry_timeout / 4),
            base: 2.0,
        };
        let retry = RetryConfig {
            backoff,
            max_retries: self.max_retries,
            retry_timeout: self.retry_timeout,
        };
        let mut options = ClientOptions::new()
            .with_timeout(self.retry_timeout.min(Duration::from_secs(120)))
            .with_connect_timeout(self.retry_timeout.min(Duration::from_secs(10)));
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(at.bucket())
            .with_region(&self.region)
            .with_access_key_id(&c.key_id)
            .with_secret_access_key(&c.secret)
            .with_retry(retry);
        if let Some(t) = &c.token {
            b = b.with_token(t);
        }
        if let Some(e) = &self.endpoint {
            options = options.with_allow_http(e.starts_with("http://"));
            b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
        }
        let store = b
            .with_client_options(options)
            .build()
            .map_err(|e| Error::Config(format!("{at}: {}", crate::chain(&e))))?;
        Ok(Arc::new(store))
    }
}

/// The part size for an object of about `size_hint` bytes: at least `base`, in MiB steps,
/// so that it fits in 9,000 parts (room for a hint that was a little short).
fn part_size_for(base: usize, size_hint: u64) -> u64 {
    let need = size_hint
        .div_ceil(MAX_PARTS - 1000)
        .next_multiple_of(1 << 20);
    (base as u64).max(need)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn env_wins_over_profile_files() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        let conf = dir.path().join("config");
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = filesecret\n\
             [work]\naws_access_key_id = WORKKEY\naws_secret_access_key = worksecret\naws_session_token = tok\n",
        )
        .unwrap();
        std::fs::write(
            &conf,
            "[default]\nregion = eu-west-1\n[profile work]\nregion = eu-central-1\nendpoint_url = http://127.0.0.1:9000\n",
        )
        .unwrap();
        let files = [
            ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
            ("AWS_CONFIG_FILE", conf.to_str().unwrap()),
        ];
        let c = cfg(&files).unwrap();
        assert_eq!(c.region(), "eu-west-1");
        assert!(c.describe_credentials().contains("FILEKEY"));
        assert!(!format!("{c:?}").contains("filesecret"));
        assert_eq!(c.endpoint(), None);

        let mut v = files.to_vec();
        v.push(("AWS_PROFILE", "work"));
        let c = cfg(&v).unwrap();
        assert_eq!(c.region(), "eu-central-1");
        assert_eq!(c.endpoint(), Some("http://127.0.0.1:9000"));
        assert!(c.describe_credentials().contains("WORKKEY"));
        assert!(c.describe_credentials().contains("[work]"));

        v.push(("AWS_ACCESS_KEY_ID", "ENVKEY"));
        v.push(("AWS_SECRET_ACCESS_KEY", "envsecret"));
        v.push(("AWS_REGION", "ap-south-1"));
        let c = cfg(&v).unwrap();
        assert_eq!(c.region(), "ap-south-1");
        assert!(c.describe_credentials().contains("ENVKEY"));
        assert!(c.describe_credentials().contains("AWS_ACCESS_KEY_ID"));

        let mut v = files.to_vec();
        v.push(("AWS_PROFILE", "nosuch"));
        assert!(matches!(cfg(&v), Err(Error::Config(m)) if m.contains("nosuch")));
    }

    #[test]
    fn no_credentials_is_an_error_at_open() {
        let c = cfg(&[("HOME", "/nonexistent")]).unwrap();
        let at = Location::parse("s3://b/k").unwrap();
        let e = c.open(&at).unwrap_err();
        assert!(
            matches!(e, Error::Config(ref m) if m.contains("no credentials")),
            "{e}"
        );
    }

    #[test]
    fn sized_uploads_grow_the_part() {
        let c = cfg(&[("HOME", "/nonexistent")]).unwrap();
        assert_eq!(c.part_size(), PART_SIZE);
        assert_eq!(c.clone().with_part_size(1).part_size(), MIN_PART);
        // 9,000 parts of 64 MiB hold 562.5 GiB; 4 TiB need 467 MiB parts.
        assert_eq!(part_size_for(PART_SIZE, 0), PART_SIZE as u64);
        assert_eq!(part_size_for(PART_SIZE, 562 << 30), PART_SIZE as u64);
        assert_eq!(part_size_for(PART_SIZE, 563 << 30), 65 << 20);
        assert_eq!(part_size_for(PART_SIZE, 4 << 40), 467 << 20);
    }
}
