//! The chat templates a config may name (`chat_template: chatml`, ...), the names mergekit
//! 0.1.5 ships. Each is our own Jinja text, written to render what the published template
//! of that name renders (tests/vocab checks them against mergekit's through transformers).

/// The template named `name`, if we ship one.
pub fn builtin(name: &str) -> Option<&'static str> {
    Some(match name {
        "chatml" => include_str!("templates/chatml.jinja"),
        "alpaca" => include_str!("templates/alpaca.jinja"),
        "llama3" => include_str!("templates/llama3.jinja"),
        "mistral" => include_str!("templates/mistral.jinja"),
        "exaone" => include_str!("templates/exaone.jinja"),
        _ => return None,
    })
}
