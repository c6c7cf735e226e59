//! The daemon's IAM and STS through the same client: AWS query requests (a form body,
//! signed for `iam` or `sts`), answered in XML. Enough for the CLI to find its account and
//! make the roles it needs; programs use the AWS SDKs.

use super::{Client, ClientError};

/// The text of the first `<tag>` element of `xml`, unescaped (the answers are Hearth's
/// own, flat and well-formed: no XML parser needed).
pub fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    let t = &xml[start..end];
    Some(t.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&apos;", "'").replace("&amp;", "&"))
}

impl Client {
    /// Calls `action` of `service` (`iam`, `sts`) with `params`; returns the XML answer.
    ///
    /// # Errors
    ///
    /// [`ClientError::Api`] with the service's error code (`NoSuchEntity`, …) and message.
    pub async fn aws_query(&self, service: &str, action: &str, params: &[(&str, &str)]) -> Result<String, ClientError> {
        let version = if service == "iam" { "2010-05-08" } else { "2011-06-15" };
        let enc = crate::aws::query::url_encode;
        let pairs = [("Action", action), ("Version", version)].into_iter().chain(params.iter().copied());
        let body = pairs.map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&").into_bytes();
        let url = format!("{}/", self.base);
        let bad_url = || ClientError::Api { status: 0, code: "InvalidUrl".into(), message: url.clone() };
        let uri: http::Uri = url.parse().map_err(|_| bad_url())?;
        let mut headers = http::HeaderMap::new();
        headers.insert("host", http::HeaderValue::from_str(uri.authority().map_or("", |a| a.as_str())).map_err(|_| bad_url())?);
        crate::sigv4::sign_for(
            service,
            &http::Method::POST,
            &uri,
            &mut headers,
            &body,
            &self.access_key,
            &self.secret,
            "hh-local-1",
            crate::clock::system(),
        )?;
        let mut req = self.http.post(&url).body(body).header("content-type", "application/x-www-form-urlencoded; charset=utf-8");
        for (k, v) in &headers {
            if k != "host" {
                req = req.header(k, v);
            }
        }
        let resp = req.send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|source| ClientError::Transport { url, source })?;
        if status >= 400 {
            return Err(ClientError::Api {
                status,
                code: xml_text(&text, "Code").unwrap_or_else(|| "Error".into()),
                message: xml_text(&text, "Message").unwrap_or(text),
            });
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_text_finds_and_unescapes() {
        let x = "<R><Role><Arn>arn:aws:iam::1:role/a&amp;b</Arn></Role><Code>X</Code></R>";
        assert_eq!(xml_text(x, "Arn").as_deref(), Some("arn:aws:iam::1:role/a&b"));
        assert_eq!(xml_text(x, "Code").as_deref(), Some("X"));
        assert_eq!(xml_text(x, "Nope"), None);
    }
}
