//! Talking to the simulator the way a vSphere client does, without the node's client: SOAP
//! calls, a login, datastore file URLs and ranged reads, all through curl (TLS verified against
//! the simulator's certificate).

use super::{Vcsim, nanos};
use anyhow::{Context, bail};
use std::io::Write;
use std::process::{Command, Stdio};

impl Vcsim {
    /// A SOAP `Login` done with curl (the CA file = the server certificate, so TLS is verified):
    /// the `vmware_soap_session` cookie value, or an error carrying the fault.
    pub fn login_cookie(&self, user: &str, password: &str) -> anyhow::Result<String> {
        let call = format!(
            concat!(
                r#"<Login xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this>"#,
                "<userName>{}</userName><password>{}</password></Login>"
            ),
            xml_escape(user),
            xml_escape(password)
        );
        let (status, cookie, body) = self.soap_call(None, &call)?;
        match cookie {
            Some(c) if status == 200 => Ok(c),
            _ => bail!("Login refused ({status}): {body}"),
        }
    }

    /// One raw SOAP call with curl (TLS verified against the server certificate): the body
    /// element of the call, e.g. `<CreateSnapshot_Task xmlns="urn:vim25">...`. Returns the
    /// HTTP status, a new session cookie if one was set, and the response text.
    pub fn soap_call(
        &self,
        cookie: Option<&str>,
        call: &str,
    ) -> anyhow::Result<(u16, Option<String>, String)> {
        let body = format!(
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?>"#,
                r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">"#,
                "<soapenv:Body>{}</soapenv:Body></soapenv:Envelope>"
            ),
            call
        );
        let headers = self.dir.path().join(format!("soap-headers-{}", nanos()));
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--cacert"])
            .arg(&self.cert_pem)
            .arg("-D")
            .arg(&headers)
            .args(["-w", "\n%{http_code}"])
            .args([
                "-H",
                "Content-Type: text/xml",
                "-H",
                "SOAPAction: urn:vim25/6.5",
            ]);
        if let Some(c) = cookie {
            cmd.args(["-b", &format!("vmware_soap_session={c}")]);
        }
        let out = cmd
            .args(["--data-binary", "@-", &self.sdk_url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().expect("piped").write_all(body.as_bytes())?;
                c.wait_with_output()
            })
            .context("running curl (package curl)")?;
        let head = std::fs::read_to_string(&headers).unwrap_or_default();
        let _ = std::fs::remove_file(&headers);
        if !out.status.success() {
            bail!(
                "curl SOAP call failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (text, status) = text.rsplit_once('\n').context("curl printed no status")?;
        let cookie = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            if !name.eq_ignore_ascii_case("set-cookie") {
                return None;
            }
            value
                .trim()
                .strip_prefix("vmware_soap_session=")?
                .split(';')
                .next()
                .map(|v| v.trim_matches('"').to_string())
        });
        Ok((status.trim().parse()?, cookie, text.to_string()))
    }

    /// The datastore URL of a disk's data file (`[ds] dir/name.vmdk` → `.../name-flat.vmdk`).
    pub fn datastore_file_url(&self, file_name: &str) -> String {
        let rel = file_name
            .split_once("] ")
            .map(|(_, r)| r)
            .unwrap_or(file_name);
        let rel = if rel.ends_with("-flat.vmdk") {
            rel.to_string()
        } else {
            format!("{}-flat.vmdk", rel.trim_end_matches(".vmdk"))
        };
        format!(
            "{}/folder/{rel}?dcPath={}&dsName={}",
            self.url, self.datacenter, self.datastore
        )
    }

    /// An HTTPS Range GET with curl: (HTTP status, body). `cookie` is the session cookie value.
    pub fn range_get(
        &self,
        url: &str,
        cookie: Option<&str>,
        offset: u64,
        len: u64,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--cacert"])
            .arg(&self.cert_pem)
            .args(["-w", "\n%{http_code}", "-r"])
            .arg(format!("{offset}-{}", offset + len - 1));
        if let Some(c) = cookie {
            cmd.args(["-b", &format!("vmware_soap_session={c}")]);
        }
        let out = cmd
            .arg(url)
            .output()
            .context("running curl (package curl)")?;
        if !out.status.success() {
            bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut body = out.stdout;
        let nl = body
            .iter()
            .rposition(|&b| b == b'\n')
            .context("curl printed no status")?;
        let status = std::str::from_utf8(&body[nl + 1..])?.trim().parse()?;
        body.truncate(nl);
        Ok((status, body))
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
