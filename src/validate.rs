//! Validation shared by the HTTP API and the command line; mirrors the schema's named CHECK
//! constraints so bad input gets a clear answer before it reaches the database.

pub const STATUSES: [&str; 6] = [
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "dead",
];

/// A run's status in the OpenAPI document (the `RunStatus` schema): one of [`STATUSES`], the
/// list the API validates against (constraint `runs_status_known`). Only its schema is used.
pub struct RunStatus;

impl utoipa::PartialSchema for RunStatus {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(STATUSES))
            .description(Some(
                "queued (waiting for its run_at, its key or a free executor), running, or how \
                 it ended: succeeded, failed, cancelled or dead (out of attempts)",
            ))
            .into()
    }
}

impl utoipa::ToSchema for RunStatus {}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':')
}

/// Run ids: 1–128 letters, digits, `-`, `_`, `:` (constraint `runs_id_format`).
pub fn run_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 || !id.chars().all(is_name_char) {
        return Err(format!(
            "invalid run id {:?}: use 1-128 letters, digits, '-', '_' or ':'",
            truncate(id)
        ));
    }
    Ok(())
}

/// Queue and workflow names: 1–128 letters, digits, `-`, `_`, `:`, `.`.
pub fn name(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 128 || !value.chars().all(|c| is_name_char(c) || c == '.')
    {
        return Err(format!(
            "invalid {what} {:?}: use 1-128 letters, digits, '-', '_', ':' or '.'",
            truncate(value)
        ));
    }
    Ok(())
}

/// Concurrency keys: 1–1024 bytes (constraint `runs_concurrency_key_length`).
pub fn concurrency_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 1024 {
        return Err("concurrency_key must be 1-1024 bytes".to_string());
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn run_ids_follow_the_subject_safe_alphabet() {
        assert!(super::run_id("abc-1_2:3").is_ok());
        assert!(super::run_id("").is_err());
        assert!(super::run_id("a.b").is_err());
        assert!(super::run_id("a b").is_err());
        assert!(super::run_id(&"x".repeat(129)).is_err());
    }
}
