//! One test per class of mapping load error: the exact message, file, line
//! and column, and that every problem is reported in one run.

use std::path::PathBuf;

use evictd::mapping::{self, load_files, Limits};

/// The diagnostics for one file `m.toml` holding `text`, as printed.
fn errors(text: &str) -> Vec<String> {
    errors_with(text, Limits::default())
}

fn errors_with(text: &str, limits: Limits) -> Vec<String> {
    match mapping::load_str("m.toml", text, limits) {
        Ok(_) => panic!("expected load errors for:\n{text}"),
        Err(diagnostics) => diagnostics.iter().map(ToString::to_string).collect(),
    }
}

/// Asserts the only diagnostic is `expected` (location, message, help).
#[track_caller]
fn check(text: &str, expected: &str) {
    assert_eq!(errors(text), [expected.trim()]);
}

const TOML_HELP: &str = "fix the TOML syntax here or just before (an unclosed `[` or quote shows where the parser gave up)";

#[test]
fn bad_toml() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"\n",
        &format!(
            "m.toml:3:21: error: invalid TOML: unclosed array, expected `]`\n  help: {TOML_HELP}"
        ),
    );
}

/// A missing `]` mid-file: one problem, the first, not the parser's
/// guesses at everything after it.
#[test]
fn a_toml_syntax_error_is_the_only_problem_reported_for_its_file() {
    let text = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\", \"order:{id}:summary\"\ntags = [\"user:{user_id}\"]\n\n[[table.refresh]]\nkey = \"order:{id}:status\"\ncolumns = [\"status\"]\nttl = \"1h\"\n";
    let found = errors(text);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].contains("error: invalid TOML"), "{found:#?}");
}

#[test]
fn unknown_field_in_table() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\nchanged_columns = [\"a\"]\n",
        "m.toml:4:1: error: unknown field `changed_columns` in [[table]]\n  help: known fields: name, keys, key, tags, versions, prefixes, surrogate_keys, on, changed, when, refresh, warm",
    );
}

#[test]
fn misspelt_field_gets_a_suggestion() {
    check(
        "[[table]]\nname = \"orders\"\nkyes = [\"order:{id}\"]\ntags = [\"t\"]\n",
        "m.toml:3:1: error: unknown field `kyes` in [[table]]\n  help: did you mean `keys`?",
    );
}

#[test]
fn unknown_field_in_refresh() {
    check(
        "[[table]]\nname = \"o\"\n[[table.refresh]]\nkey = \"o:{id}\"\ncolumns = [\"id\"]\nexpiry = \"1h\"\n",
        "m.toml:6:1: error: unknown field `expiry` in [[table.refresh]]\n  help: known fields: key, columns, ttl, jitter, when",
    );
}

#[test]
fn unknown_top_level_key() {
    check(
        "[[tables]]\nname = \"o\"\n",
        "m.toml:1:3: error: unknown field `tables` at the top level\n  help: did you mean `table`?",
    );
}

#[test]
fn wrong_type() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = \"order:{id}\"\n",
        "m.toml:3:1: error: `keys` must be an array of strings\n  help: write a list, e.g. [\"a\", \"b\"]",
    );
}

#[test]
fn wrong_item_type() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\", 7]\n",
        "m.toml:3:23: error: `keys` must hold templates or tables, found a integer\n  help: put each template in double quotes, or write { template = \"...\", when = \"...\" }",
    );
}

#[test]
fn missing_name() {
    check(
        "[[table]]\nkeys = [\"order:{id}\"]\n",
        "m.toml:1:1: error: [[table]] entry has no `name`\n  help: add `name = \"schema.table\"` to the entry",
    );
}

#[test]
fn bad_table_name() {
    check(
        "[[table]]\nname = \"a.b.c\"\nkeys = [\"x\"]\n",
        "m.toml:2:8: error: `a.b.c` is not `table` or `schema.table`\n  help: write `table` or `schema.table`",
    );
}

#[test]
fn unclosed_placeholder() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"user:{user_id:orders\"]\n",
        "m.toml:3:15: error: unclosed `{` in template\n  help: close the placeholder with `}`, or write `{{` for a literal brace",
    );
}

#[test]
fn empty_placeholder() {
    check(
        "[[table]]\nname = \"orders\"\ntags = [\"user:{}\"]\n",
        "m.toml:3:15: error: empty placeholder `{}`\n  help: name a column inside the braces, e.g. `{id}`",
    );
}

#[test]
fn unmatched_closing_brace() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"order:id}\"]\n",
        "m.toml:3:18: error: unmatched `}` in template\n  help: write `}}` for a literal brace",
    );
}

#[test]
fn placeholder_that_is_not_a_column() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{user id}\"]\n",
        "m.toml:3:16: error: `{user id}` is not a column placeholder\n  help: a placeholder holds one column name (letters, digits, `_`, `$`, not starting with a digit), then optionally `.field` steps into a json column and one `|transform`",
    );
}

#[test]
fn unknown_op() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"o:{id}\"]\non = [\"insert\", \"upsert\"]\n",
        "m.toml:4:17: error: unknown op `upsert` in `on`\n  help: did you mean \"insert\"?",
    );
}

#[test]
fn empty_on() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"o:{id}\"]\non = []\n",
        "m.toml:4:6: error: `on` is empty, so the mapping would never apply\n  help: list the ops to act on, or remove `on` for all four",
    );
}

#[test]
fn empty_changed() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"o:{id}\"]\nchanged = []\n",
        "m.toml:4:11: error: `changed` is empty, so every update would be skipped\n  help: list the columns whose change matters, or remove `changed`",
    );
}

#[test]
fn bad_column_in_changed() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"o:{id}\"]\nchanged = [\"total amount\"]\n",
        "m.toml:4:12: error: `total amount` in `changed` is not a column name\n  help: write a column name: letters, digits, `_`, `$`, not starting with a digit",
    );
}

const REFRESH_HEAD: &str =
    "[[table]]\nname = \"orders\"\n[[table.refresh]]\nkey = \"o:{id}\"\ncolumns = [\"id\"]\n";

#[test]
fn bad_duration() {
    check(
        &format!("{REFRESH_HEAD}ttl = \"soon\"\n"),
        "m.toml:6:7: error: bad ttl `soon`: `soon` does not start with a whole number\n  help: write whole numbers with the units s, m, h and d, largest first, from 1s to 365d: e.g. \"30s\", \"15m\", \"1h30m\", \"7d\"",
    );
}

#[test]
fn sub_second_duration() {
    check(
        &format!("{REFRESH_HEAD}ttl = \"1500ms\"\n"),
        "m.toml:6:7: error: bad ttl `1500ms`: a TTL is whole seconds\n  help: write whole numbers with the units s, m, h and d, largest first, from 1s to 365d: e.g. \"30s\", \"15m\", \"1h30m\", \"7d\"",
    );
}

#[test]
fn bad_jitter() {
    check(
        &format!("{REFRESH_HEAD}ttl = \"1h\"\njitter = \"150%\"\n"),
        "m.toml:7:10: error: bad jitter `150%`\n  help: write a percentage of the ttl from 0% to below 100%, e.g. \"10%\"",
    );
}

#[test]
fn jitter_without_ttl() {
    check(
        &format!("{REFRESH_HEAD}jitter = \"10%\"\n"),
        "m.toml:6:10: error: `jitter` without `ttl`\n  help: add a `ttl` for the jitter to vary, or remove `jitter`",
    );
}

#[test]
fn refresh_without_key() {
    check(
        "[[table]]\nname = \"orders\"\n[[table.refresh]]\ncolumns = [\"id\"]\n",
        "m.toml:3:1: error: [[table.refresh]] has no `key`\n  help: add `key = \"...\"`, the key to write",
    );
}

#[test]
fn refresh_without_columns() {
    check(
        "[[table]]\nname = \"orders\"\n[[table.refresh]]\nkey = \"o:{id}\"\n",
        "m.toml:4:7: error: [[table.refresh]] has no `columns`\n  help: add `columns = [...]`, the columns of the JSON value",
    );
}

#[test]
fn refresh_key_that_is_also_a_delete_key() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"o:{id}\"]\n[[table.refresh]]\nkey = \"o:{id}\"\ncolumns = [\"id\"]\n",
        "m.toml:5:7: error: refresh key `o:{id}` is also a delete key in `keys`\n  help: remove it from `keys`: the refresh already replaces the stale value",
    );
}

#[test]
fn table_that_maps_nothing() {
    check(
        "[[table]]\nname = \"orders\"\non = [\"insert\"]\n",
        "m.toml:2:8: error: table public.orders maps nothing\n  help: give it `keys`, `tags`, `versions`, `prefixes`, `surrogate_keys` or a [[table.refresh]]",
    );
}

#[test]
fn duplicate_template() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"o:{id}\", \"o:{id}\"]\n",
        "m.toml:3:19: error: `o:{id}` is listed twice in `keys`\n  help: remove the duplicate, or merge the two into one key table",
    );
}

#[test]
fn duplicate_table_across_files() {
    let files = [
        (
            PathBuf::from("a.toml"),
            "[[table]]\nname = \"orders\"\nkeys = [\"a\"]\n".to_owned(),
        ),
        (
            PathBuf::from("b.toml"),
            "\n[[table]]\nname = \"public.orders\"\nkeys = [\"b\"]\n".to_owned(),
        ),
    ];
    let errors: Vec<String> = load_files(&files, Limits::default())
        .expect_err("duplicate")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errors,
        ["b.toml:3:8: error: table public.orders is mapped twice; first at a.toml:2:8\n  help: merge the two [[table]] entries into one"]
    );
}

#[test]
fn template_longer_than_the_key_limit() {
    let limits = Limits {
        max_key_bytes: 16,
        ..Limits::default()
    };
    let errors = errors_with(
        "[[table]]\nname = \"o\"\nkeys = [\"a-very-long-literal-key:{id}\"]\n",
        limits,
    );
    assert_eq!(
        errors,
        ["m.toml:3:9: error: template `a-very-long-literal-key:{id}` is longer than max_key_bytes = 16\n  help: shorten the template, or raise `mappings.max_key_bytes`"]
    );
}

#[test]
fn too_many_keys_per_change() {
    let limits = Limits {
        max_keys_per_change: 4,
        ..Limits::default()
    };
    let errors = errors_with(
        "[[table]]\nname = \"o\"\nkeys = [\"a:{id}\", \"b:{id}\", \"c:{id}\"]\n",
        limits,
    );
    assert_eq!(
        errors,
        ["m.toml:2:8: error: table public.o renders up to 6 keys per change (old and new row), more than max_keys_per_change = 4\n  help: use tags for large groups of keys, or raise `mappings.max_keys_per_change`"]
    );
}

#[test]
fn empty_file() {
    check("# nothing here\n", "m.toml:1:1: error: the file maps no table\n  help: add a `[[table]]` section, or delete the file");
}

#[test]
fn every_problem_of_every_file_in_one_run() {
    let files = [
        (
            PathBuf::from("a.toml"),
            "[[table]]\nname = \"orders\"\nkyes = [\"x\"]\nkeys = [\"o:{\"]\non = [\"upsert\"]\n"
                .to_owned(),
        ),
        (
            PathBuf::from("b.toml"),
            "[[table]]\nname = \"users\"\ntags = \"u\"\n".to_owned(),
        ),
    ];
    let errors = load_files(&files, Limits::default()).expect_err("several problems");
    let places: Vec<String> = errors
        .iter()
        .map(|d| {
            d.location
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        places,
        ["a.toml:3:1", "a.toml:4:12", "a.toml:5:7", "b.toml:3:1"]
    );
}

#[test]
fn missing_and_empty_directories() {
    let missing = mapping::load_dir(
        std::path::Path::new("/nonexistent/mappings"),
        Limits::default(),
    )
    .expect_err("missing");
    assert!(missing[0]
        .to_string()
        .starts_with("error: cannot read the mappings directory /nonexistent/mappings:"));
    let empty = tempfile::tempdir().expect("tempdir");
    let errors = mapping::load_dir(empty.path(), Limits::default()).expect_err("empty");
    assert_eq!(
        errors[0].to_string(),
        format!(
            "error: no mapping files (*.toml) in {}\n  help: add a file such as orders.toml with a [[table]] section",
            empty.path().display()
        )
    );
}

#[test]
fn evictds_own_key_space_is_reserved() {
    check(
        "[[table]]\nname = \"orders\"\nversions = [\"evictd:{id}\"]\n",
        "m.toml:3:13: error: `evictd:{id}` is under `evictd:`, where evictd keeps its own keys\n  help: give the family another name, e.g. \"app:...\"",
    );
}

#[test]
fn a_condition_that_does_not_parse_is_located_at_its_character() {
    check(
        "[[table]]\nname = \"orders\"\nkeys = [\"o:{id}\"]\nwhen = \"status = 'paid' and total >> 5\"\n",
        "m.toml:4:36: error: in `when`: expected a value, found `>`\n  help: compare with a number, 'text' in single quotes, true or false (columns cannot be compared with each other)",
    );
    check(
        "[[table]]\nname = \"orders\"\n[[table.refresh]]\nkey = \"o:{id}\"\ncolumns = [\"id\"]\nwhen = \"note = null\"\n",
        "m.toml:6:16: error: in `when`: a comparison with null is never true\n  help: write `column is null` or `column is not null`",
    );
}

#[test]
fn a_key_table_needs_a_template_and_knows_its_fields() {
    check(
        "[[table]]\nname = \"orders\"\n[[table.key]]\nwhen = \"total > 1\"\n",
        "m.toml:3:1: error: a key table has no `template`\n  help: add `template = \"...\"`, the key to delete",
    );
    check(
        "[[table]]\nname = \"orders\"\nkeys = [{ template = \"o:{id}\", where = \"total > 1\" }]\n",
        "m.toml:3:32: error: unknown field `where` in a key table\n  help: did you mean `when`?",
    );
    check(
        "[[table]]\nname = \"orders\"\n[[table.key]]\ntemplate = \"o:{id}\"\nchanged = []\n",
        "m.toml:5:11: error: `changed` is empty, so every update would be skipped\n  help: list the columns whose change matters, or remove `changed`",
    );
}

#[test]
fn a_prefix_must_end_with_a_separator() {
    check(
        "[[table]]\nname = \"users\"\nprefixes = [\"user:{id}\"]\n",
        "m.toml:3:13: error: prefix `user:{id}` does not end with a separator\n  help: end it with one, e.g. \"user:{id}:\": without, its SCAN would also delete keys that merely start with the same text (`user:1` matches `user:10...`)",
    );
}

#[test]
fn an_unknown_transform_or_a_bad_json_path_is_located_with_a_suggestion() {
    check(
        "[[table]]\nname = \"users\"\nkeys = [\"user:{email|lowr}\"]\n",
        "m.toml:3:22: error: unknown transform `lowr` in `{email|lowr}`\n  help: did you mean `lower`?",
    );
    check(
        "[[table]]\nname = \"users\"\nkeys = [\"user:{payload..slug}\"]\n",
        "m.toml:3:15: error: `{payload..slug}`: an empty step is not a json field or array index\n  help: write the path as `.field` and `.0` steps, e.g. `{payload.items.0.id}`",
    );
}

#[test]
fn a_warm_section_needs_refreshes_and_a_limit_to_order() {
    assert_eq!(
        errors(
            "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n\n[[table.warm]]\norder_by = \"total desc\"\nlimit = 0\nlimits = 1\n"
        ),
        [
            "m.toml:5:1: error: [[table.warm]] on an entry with no [[table.refresh]]: there is nothing to warm\n  help: add a [[table.refresh]] section, or remove the [[table.warm]] one",
            "m.toml:5:1: error: [[table.warm]] has `order_by` but no `limit`\n  help: add `limit = N`: an ordered warm reads its rows in one query",
            "m.toml:7:1: error: `limit` must be a positive integer\n  help: write how many rows to warm, e.g. 1000",
            "m.toml:8:1: error: unknown field `limits` in [[table.warm]]\n  help: did you mean `limit`?",
        ]
    );
}
