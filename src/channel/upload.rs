//! File upload (`POST /v3/directline/conversations/{id}/upload?userId=`) and the files' URLs
//! (`GET /v3/directline/attachments/{conversation}/{key}`).
//!
//! An upload is one file as the raw body (`Content-Type`, `Content-Disposition: ...;
//! filename=...`), or `multipart/form-data` with `file` parts and at most one part of type
//! `application/vnd.microsoft.activity` whose activity the files attach to (DirectLineJS's
//! `postActivity` with attachments sends that form). The files are stored with the
//! conversation, the activity gets one attachment per file with a `contentUrl` the bot (and the
//! user's client) can fetch, and the activity then takes the same path as a posted message:
//! metered, echoed, answered. When that path refuses it (rate limit, capacity, a down bot), the
//! files are removed and nothing is held.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::auth::Credential;
use super::directline::open_conversation;
use super::turn;
use crate::config::ChannelConfig;
use crate::conversation::Conversation;
use crate::conversation::files::Refusal;
use crate::error::ApiError;
use crate::state::AppState;

/// The content type of the activity part of an upload form.
pub const ACTIVITY_PART: &str = "application/vnd.microsoft.activity";

/// The upload's query.
#[derive(Deserialize)]
pub struct UploadQuery {
    #[serde(rename = "userId")]
    user_id: Option<String>,
}

/// One file of an upload.
#[derive(Debug)]
pub struct Part {
    /// Its name, cleaned of any path.
    pub name: String,
    /// Its content type.
    pub content_type: String,
    /// Its bytes.
    pub bytes: Bytes,
}

/// What an upload carries.
#[derive(Debug)]
pub struct Form {
    /// The activity the files attach to, if the form had one.
    pub activity: Option<Map<String, Value>>,
    /// The files.
    pub files: Vec<Part>,
}

/// `POST /v3/directline/conversations/{id}/upload?userId=`.
pub async fn upload(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<UploadQuery>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let ch = app.channel();
    let (parts, body) = req.into_parts();
    let (cred, conv) = open_conversation(ch, &parts.headers, &id)?;
    let result = take(&app, &cred, &conv, q, &parts.headers, body).await;
    ch.files.count_upload(result.is_ok());
    result.map(|id| turn::id_answer(&id))
}

async fn take(
    app: &AppState,
    cred: &Credential,
    conv: &std::sync::Arc<Conversation>,
    q: UploadQuery,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<String, ApiError> {
    let ch = app.channel();
    let config = &app.config().channel;
    let user_id = match q.user_id {
        Some(u) if !u.is_empty() && u.len() <= 256 => u,
        _ => return Err(ApiError::bad_request("The upload needs `userId` (the user's id) in its query.")),
    };
    // Held until the files are stored or refused: what is read in memory at once is bounded.
    let Some(reading) = ch.files.begin_upload() else {
        return Err(ApiError::unavailable(
            "Overloaded",
            "The gateway is reading as many uploads as it allows at once. Try again shortly.",
        )
        .with_retry_after(5));
    };
    let body = turn::read_body(body).await?;
    turn::check_accepting(ch, conv)?;
    let form = parse(headers, body, config).await?;
    check_files(&form.files, config)?;
    let mut a = form.activity.unwrap_or_else(|| {
        let mut a = Map::new();
        a.insert("type".into(), Value::String("message".into()));
        a
    });
    if super::activity::kind(&a) != "message" {
        return Err(ApiError::bad_request("The activity of an upload is a `message`."));
    }
    // The query's user, where the activity names none (a token's bound user still wins).
    match a.get_mut("from") {
        Some(Value::Object(from)) => {
            from.entry("id").or_insert(Value::String(user_id));
        }
        _ => {
            a.insert("from".into(), json!({ "id": user_id }));
        }
    }
    let keys = store(app, conv, form.files, &mut a).await?;
    drop(reading);
    match turn::take(app, cred, conv, a).await {
        Ok(id) => Ok(id),
        Err(e) => {
            conv.files.remove(&keys);
            Err(e)
        }
    }
}

/// Stores the files with the conversation and attaches them to the activity; returns their keys.
/// Nothing stays stored when one is refused.
async fn store(
    app: &AppState,
    conv: &std::sync::Arc<Conversation>,
    files: Vec<Part>,
    a: &mut Map<String, Value>,
) -> Result<Vec<Box<str>>, ApiError> {
    let ch = app.channel();
    let mut keys: Vec<Box<str>> = Vec::with_capacity(files.len());
    let mut attachments = Vec::with_capacity(files.len());
    for part in files {
        let key = ch.signer.file_key(&conv.id);
        match ch.files.put(&conv.files, &conv.bot, &key, &part.name, &part.content_type, part.bytes).await {
            Ok(_) => {}
            Err(refusal) => {
                conv.files.remove(&keys);
                return Err(refused(refusal));
            }
        }
        attachments.push(json!({
            "contentType": part.content_type,
            "contentUrl": format!("{}/v3/directline/attachments/{}/{}", ch.service_base, conv.id, key),
            "name": part.name,
        }));
        keys.push(key.into());
    }
    // DirectLineJS lists the files in the activity part as attachments without a URL or content
    // (their names and types): the uploaded files take their place. Cards and links stay.
    match a.entry("attachments").or_insert_with(|| Value::Array(Vec::new())) {
        Value::Array(list) => {
            list.retain(|x| x.get("contentUrl").is_some_and(Value::is_string) || x.get("content").is_some());
            list.extend(attachments);
        }
        other => *other = Value::Array(attachments),
    }
    Ok(keys)
}

fn refused(r: Refusal) -> ApiError {
    match r {
        Refusal::Conversation => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "UploadBudgetExceeded",
            "This conversation holds as many bytes of files as the gateway keeps for one conversation.",
        ),
        Refusal::Bot | Refusal::Node => ApiError::unavailable(
            "Overloaded",
            "The gateway holds as many bytes of uploaded files as it allows. Try again shortly.",
        )
        .with_retry_after(30),
        Refusal::Io(e) => {
            tracing::error!(error = %e, "An uploaded file could not be written.");
            ApiError::internal()
        }
    }
}

/// At least one file, at most `channel.max_upload_files`, each of an allowed content type.
fn check_files(files: &[Part], config: &ChannelConfig) -> Result<(), ApiError> {
    if files.is_empty() {
        return Err(ApiError::bad_request("The upload has no file (a part named `file`)."));
    }
    if files.len() > config.max_upload_files {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "TooManyFiles",
            format!("An upload carries at most {} files.", config.max_upload_files),
        ));
    }
    if let Some(p) = files.iter().find(|p| !config.upload_allowed(&p.content_type)) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("Files of type `{}` are not accepted by this gateway.", p.content_type),
        ));
    }
    Ok(())
}

/// Reads an upload: a multipart form, or one file as the raw body.
pub async fn parse(headers: &HeaderMap, body: Bytes, config: &ChannelConfig) -> Result<Form, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").trim();
    if content_type.to_ascii_lowercase().starts_with("multipart/form-data") {
        return parse_form(content_type, body, config).await;
    }
    if content_type.is_empty() {
        return Err(ApiError::bad_request(
            "An upload is `multipart/form-data`, or one file with its `Content-Type`.",
        ));
    }
    let name = headers
        .get(header::CONTENT_DISPOSITION)
        .and_then(|v| v.to_str().ok())
        .and_then(disposition_filename)
        .unwrap_or_default();
    Ok(Form {
        activity: None,
        files: vec![Part { name: clean_name(&name), content_type: bare_type(content_type), bytes: body }],
    })
}

async fn parse_form(content_type: &str, body: Bytes, config: &ChannelConfig) -> Result<Form, ApiError> {
    let bad = |e: multer::Error| ApiError::bad_request(format!("The multipart form is malformed: {e}."));
    let boundary = multer::parse_boundary(content_type).map_err(bad)?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(body) });
    // Bounded already by the body limit; the field count bounds the parser's work.
    let constraints = multer::Constraints::new().size_limit(
        multer::SizeLimit::new()
            .whole_stream(config.max_upload_bytes as u64)
            .per_field(config.max_upload_bytes as u64),
    );
    let mut form = multer::Multipart::with_constraints(stream, boundary, constraints);
    let mut out = Form { activity: None, files: Vec::new() };
    let mut parts = 0usize;
    while let Some(field) = form.next_field().await.map_err(bad)? {
        parts += 1;
        if parts > config.max_upload_files + 1 {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "TooManyFiles",
                format!("An upload carries at most {} files.", config.max_upload_files),
            ));
        }
        let ct = field.content_type().map(|m| m.essence_str().to_ascii_lowercase());
        let is_activity = ct.as_deref() == Some(ACTIVITY_PART) || field.name() == Some("activity");
        if is_activity {
            if out.activity.is_some() {
                return Err(ApiError::bad_request("An upload carries at most one activity part."));
            }
            let bytes = field.bytes().await.map_err(bad)?;
            out.activity = Some(super::activity::parse(&bytes)?);
            continue;
        }
        if field.name() != Some("file") {
            return Err(ApiError::bad_request(
                "An upload form has parts named `file` and at most one activity part.",
            ));
        }
        let name = clean_name(field.file_name().unwrap_or(""));
        let content_type = ct.unwrap_or_else(|| "application/octet-stream".to_string());
        let bytes = field.bytes().await.map_err(bad)?;
        out.files.push(Part { name, content_type, bytes });
    }
    Ok(out)
}

/// `type/subtype` of a content type, lowercase, without parameters.
fn bare_type(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// The file name of a `Content-Disposition` value: `filename*=UTF-8''...` (percent-encoded)
/// before `filename="..."`.
fn disposition_filename(value: &str) -> Option<String> {
    let mut plain = None;
    for param in value.split(';').map(str::trim) {
        let Some((k, v)) = param.split_once('=') else { continue };
        match k.trim().to_ascii_lowercase().as_str() {
            "filename*" => {
                let encoded = v.trim().split_once("''").map_or(v.trim(), |(_, e)| e);
                if let Ok(name) = percent_encoding::percent_decode_str(encoded).decode_utf8() {
                    return Some(name.into_owned());
                }
            }
            "filename" => plain = Some(v.trim().trim_matches('"').to_string()),
            _ => {}
        }
    }
    plain
}

/// A file name without any folder, control characters or quotes, at most 255 characters;
/// `file` when nothing is left.
fn clean_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = base
        .chars()
        .filter(|c| !c.is_control() && *c != '"')
        .take(255)
        .collect::<String>()
        .trim()
        .to_string();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." { "file".to_string() } else { cleaned }
}

/// `GET /v3/directline/attachments/{conversation}/{key}`: an uploaded file, while its
/// conversation lasts. The key is unguessable and checked (HMAC) before any lookup.
pub async fn file(
    State(app): State<AppState>,
    Path((conversation, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let ch = app.channel();
    let gone = || ApiError::not_found("No such file; files last as long as their conversation.");
    if !ch.signer.check_file_key(&conversation, &key) {
        return Err(gone());
    }
    let conv = ch.conversations.get(&conversation, ch.clock.now_ms()).ok_or_else(gone)?;
    let stored = conv.files.get(&key).ok_or_else(gone)?;
    let bytes = stored.bytes().await.map_err(|e| {
        tracing::error!(error = %e, "An uploaded file could not be read.");
        ApiError::internal()
    })?;
    let mut res = bytes.into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&stored.content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(&content_disposition(&stored.name)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    // A stranger's file is never run as a page of this origin.
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; sandbox"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=300"));
    Ok(res)
}

/// Everything but RFC 3986's unreserved characters is percent-encoded.
pub const UNRESERVED: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// `attachment` with the name as ASCII (`filename`) and as UTF-8 (`filename*`).
fn content_disposition(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' })
        .collect();
    let encoded = percent_encoding::utf8_percent_encode(name, UNRESERVED);
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_lose_folders_and_control_characters() {
        assert_eq!(clean_name("../../etc/passwd"), "passwd");
        assert_eq!(clean_name("C:\\Users\\me\\report.pdf"), "report.pdf");
        assert_eq!(clean_name("a\"b\u{7}.txt"), "ab.txt");
        assert_eq!(clean_name(""), "file");
        assert_eq!(clean_name(".."), "file");
        assert_eq!(clean_name(&"x".repeat(300)).len(), 255);
    }

    #[test]
    fn disposition_names_prefer_the_utf8_form() {
        assert_eq!(disposition_filename("attachment; filename=\"a b.png\"").as_deref(), Some("a b.png"));
        assert_eq!(
            disposition_filename("attachment; filename=\"x.png\"; filename*=UTF-8''%C3%A9t%C3%A9.png")
                .as_deref(),
            Some("été.png")
        );
        assert_eq!(disposition_filename("inline").as_deref(), None);
        // Not UTF-8 once decoded: the plain name; a stray `%` is kept as it is.
        assert_eq!(
            disposition_filename("attachment; filename*=UTF-8''%FF; filename=y").as_deref(),
            Some("y")
        );
        assert_eq!(
            disposition_filename("attachment; filename*=UTF-8''100%25%ZZ").as_deref(),
            Some("100%%ZZ")
        );
    }

    #[test]
    fn served_names_are_quoted_safely() {
        assert_eq!(
            content_disposition("é \"x\".png"),
            "attachment; filename=\"_ _x_.png\"; filename*=UTF-8''%C3%A9%20%22x%22.png"
        );
    }
}
