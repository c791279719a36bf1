//! Data-driven tests of the pure core: a mapping and a batch of changes in,
//! the exact ordered commands out. One helper, many small cases.

use std::sync::Arc;

use evictd::change::{Datum, Op, Row, RowChange, TableName};
use evictd::mapping::{self, Limits, Output};
use evictd::plan::plan_changes;

/// Maps and plans `changes` with `mapping` (one file's text) and compares
/// the commands, one per line, with `expected`.
#[track_caller]
fn check(mapping: &str, changes: &[RowChange], expected: &str) {
    check_with(mapping, Limits::default(), changes, expected);
}

#[track_caller]
fn check_with(mapping: &str, limits: Limits, changes: &[RowChange], expected: &str) {
    let mappings = mapping::load_str("test.toml", mapping, limits)
        .unwrap_or_else(|errors| panic!("mapping does not load: {errors:#?}"));
    let plan = plan_changes(&mappings, changes, &mut Output::default());
    let actual: Vec<String> = plan.commands.iter().map(ToString::to_string).collect();
    let expected: Vec<&str> = expected
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    assert_eq!(actual, expected, "\nactual:\n{}\n", actual.join("\n"));
}

/// A value: `NULL` and `TOAST` (unchanged TOAST) are special, integers are
/// numbers, everything else text.
fn datum(text: &str) -> Datum {
    match text {
        "NULL" => Datum::Null,
        "TOAST" => Datum::UnchangedToast,
        "true" => Datum::Bool(true),
        "false" => Datum::Bool(false),
        _ if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
            Datum::Number(text.into())
        }
        _ => Datum::text(text),
    }
}

fn row(pairs: &[(&str, &str)]) -> Row {
    Row::from_pairs(pairs.iter().map(|&(name, value)| (name, datum(value))))
}

fn change(table: &str, op: Op, old: Option<Row>, new: Option<Row>) -> RowChange {
    RowChange {
        table: Arc::new(TableName::parse(table).expect("table name")),
        op,
        old,
        new,
    }
}

fn insert(table: &str, new: &[(&str, &str)]) -> RowChange {
    change(table, Op::Insert, None, Some(row(new)))
}

fn update(table: &str, old: &[(&str, &str)], new: &[(&str, &str)]) -> RowChange {
    change(table, Op::Update, Some(row(old)), Some(row(new)))
}

fn delete(table: &str, old: &[(&str, &str)]) -> RowChange {
    change(table, Op::Delete, Some(row(old)), None)
}

fn truncate(table: &str) -> RowChange {
    change(table, Op::Truncate, None, None)
}

const ORDERS: &str = r#"
[[table]]
name = "orders"
keys = ["user:{user_id}:orders", "order:{id}"]
tags = ["user:{user_id}"]
"#;

const ORDER_SUMMARY: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}"]

[[table.refresh]]
key = "order:{id}:summary"
columns = ["id", "status", "total"]
ttl = "1h"
"#;

const KEY_ONLY: &str = r#"
[[table]]
name = "things"
keys = ["thing:{v}"]
"#;

// ---- basic ops -------------------------------------------------------------

#[test]
fn insert_renders_keys_from_the_new_row() {
    check(
        ORDERS,
        &[insert("orders", &[("id", "7"), ("user_id", "1")])],
        "
        UNLINK user:1:orders
        UNLINK order:7
        TAG user:1
    ",
    );
}

#[test]
fn delete_renders_keys_from_the_old_row() {
    check(
        ORDERS,
        &[delete("orders", &[("id", "7"), ("user_id", "3")])],
        "
        UNLINK user:3:orders
        UNLINK order:7
        TAG user:3
    ",
    );
}

#[test]
fn update_with_equal_renderings_acts_once() {
    let row = [("id", "7"), ("user_id", "1")];
    check(
        ORDERS,
        &[update("orders", &row, &row)],
        "
        UNLINK user:1:orders
        UNLINK order:7
        TAG user:1
    ",
    );
}

#[test]
fn fk_move_invalidates_old_and_new_keys() {
    check(
        ORDERS,
        &[update(
            "orders",
            &[("id", "7"), ("user_id", "1")],
            &[("id", "7"), ("user_id", "2")],
        )],
        "
        UNLINK user:1:orders
        UNLINK user:2:orders
        UNLINK order:7
        TAG user:1
        TAG user:2
    ",
    );
}

#[test]
fn fk_move_of_a_product_between_categories() {
    let mapping = r#"
        [[table]]
        name = "products"
        keys = ["category:{category_id}:products", "product:{id}"]
    "#;
    let old = [("id", "5"), ("category_id", "10")];
    let new = [("id", "5"), ("category_id", "11")];
    check(
        mapping,
        &[update("products", &old, &new)],
        "
        UNLINK category:10:products
        UNLINK category:11:products
        UNLINK product:5
    ",
    );
}

#[test]
fn schema_qualified_tables() {
    let mapping = "[[table]]\nname = \"billing.invoices\"\nkeys = [\"invoice:{id}\"]";
    check(
        mapping,
        &[
            insert("billing.invoices", &[("id", "1")]),
            insert("invoices", &[("id", "2")]),
        ],
        "
        UNLINK invoice:1
    ",
    );
}

#[test]
fn unmapped_tables_produce_nothing() {
    check(ORDERS, &[insert("payments", &[("id", "1")])], "");
}

#[test]
fn constant_keys_and_literal_braces() {
    let mapping = r#"
        [[table]]
        name = "categories"
        keys = ["categories:tree", "{{json}}:{id}"]
    "#;
    check(
        mapping,
        &[insert("categories", &[("id", "4")])],
        "
        UNLINK categories:tree
        UNLINK {json}:4
    ",
    );
}

// ---- escaping --------------------------------------------------------------

#[test]
fn escapes_colons() {
    check(
        KEY_ONLY,
        &[insert("things", &[("v", "1:orders")])],
        "UNLINK thing:1%3Aorders",
    );
}

#[test]
fn escapes_glob_stars_and_questions() {
    check(
        KEY_ONLY,
        &[insert("things", &[("v", "a*b?")])],
        "UNLINK thing:a%2Ab%3F",
    );
}

#[test]
fn escapes_braces() {
    check(
        KEY_ONLY,
        &[insert("things", &[("v", "{x}")])],
        "UNLINK thing:%7Bx%7D",
    );
}

#[test]
fn escapes_brackets() {
    check(
        KEY_ONLY,
        &[insert("things", &[("v", "[ab]")])],
        "UNLINK thing:%5Bab%5D",
    );
}

#[test]
fn escapes_whitespace() {
    check(
        KEY_ONLY,
        &[insert("things", &[("v", "a b\tc\nd")])],
        "UNLINK thing:a%20b%09c%0Ad",
    );
}

#[test]
fn escapes_percent_so_escapes_cannot_collide() {
    check(
        KEY_ONLY,
        &[
            insert("things", &[("v", "%3A")]),
            insert("things", &[("v", ":")]),
        ],
        "
        UNLINK thing:%253A
        UNLINK thing:%3A
    ",
    );
}

#[test]
fn keeps_unicode() {
    check(
        KEY_ONLY,
        &[insert("things", &[("v", "zoë→日本")])],
        "UNLINK thing:zoë→日本",
    );
}

#[test]
fn empty_string_renders_empty() {
    check(KEY_ONLY, &[insert("things", &[("v", "")])], "UNLINK thing:");
}

#[test]
fn booleans_render_as_postgres_text() {
    check(
        KEY_ONLY,
        &[insert("things", &[("v", "true")])],
        "UNLINK thing:t",
    );
}

// ---- NULL placeholders -----------------------------------------------------

#[test]
fn null_placeholder_skips_only_that_key() {
    check(
        ORDERS,
        &[insert("orders", &[("id", "7"), ("user_id", "NULL")])],
        "UNLINK order:7",
    );
}

#[test]
fn fk_move_from_null_invalidates_only_the_new_owner() {
    check(
        ORDERS,
        &[update(
            "orders",
            &[("id", "7"), ("user_id", "NULL")],
            &[("id", "7"), ("user_id", "2")],
        )],
        "
        UNLINK user:2:orders
        UNLINK order:7
        TAG user:2
    ",
    );
}

// ---- `on` and `changed` filters ---------------------------------------------

#[test]
fn on_filter_skips_unlisted_ops() {
    let mapping =
        "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\non = [\"update\", \"delete\"]";
    check(
        mapping,
        &[
            insert("orders", &[("id", "1")]),
            delete("orders", &[("id", "2")]),
        ],
        "UNLINK order:2",
    );
}

#[test]
fn on_filter_truncate_only() {
    let mapping = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\non = [\"truncate\"]";
    check(
        mapping,
        &[insert("orders", &[("id", "1")]), truncate("orders")],
        "UNLINK MATCH order:*",
    );
}

const CHANGED: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}"]
changed = ["status"]
"#;

#[test]
fn changed_filter_skips_updates_of_other_columns() {
    let old = [("id", "1"), ("status", "new"), ("note", "a")];
    let new = [("id", "1"), ("status", "new"), ("note", "b")];
    check(CHANGED, &[update("orders", &old, &new)], "");
}

#[test]
fn changed_filter_passes_updates_of_listed_columns() {
    let old = [("id", "1"), ("status", "new")];
    let new = [("id", "1"), ("status", "paid")];
    check(CHANGED, &[update("orders", &old, &new)], "UNLINK order:1");
}

#[test]
fn changed_filter_counts_an_unknown_old_value_as_changed() {
    let old = [("id", "1")];
    let new = [("id", "1"), ("status", "new")];
    check(CHANGED, &[update("orders", &old, &new)], "UNLINK order:1");
}

#[test]
fn changed_filter_counts_unchanged_toast_as_unchanged() {
    let old = [("id", "1")];
    let new = [("id", "1"), ("status", "TOAST")];
    check(CHANGED, &[update("orders", &old, &new)], "");
}

#[test]
fn changed_filter_does_not_apply_to_inserts_and_deletes() {
    check(
        CHANGED,
        &[
            insert("orders", &[("id", "1")]),
            delete("orders", &[("id", "2")]),
        ],
        "
        UNLINK order:1
        UNLINK order:2
    ",
    );
}

// ---- refresh -----------------------------------------------------------------

#[test]
fn refresh_on_insert_writes_json_after_deletes() {
    check(
        ORDER_SUMMARY,
        &[insert(
            "orders",
            &[("id", "7"), ("status", "new"), ("total", "12")],
        )],
        r#"
        UNLINK order:7
        SET order:7:summary {"id":7,"status":"new","total":12} EX 3600
    "#,
    );
}

#[test]
fn refresh_on_update_writes_the_new_row() {
    let old = [("id", "7"), ("status", "new"), ("total", "12")];
    let new = [("id", "7"), ("status", "paid"), ("total", "12")];
    check(
        ORDER_SUMMARY,
        &[update("orders", &old, &new)],
        r#"
        UNLINK order:7
        SET order:7:summary {"id":7,"status":"paid","total":12} EX 3600
    "#,
    );
}

#[test]
fn refresh_on_delete_deletes_its_key() {
    check(
        ORDER_SUMMARY,
        &[delete(
            "orders",
            &[("id", "7"), ("status", "new"), ("total", "1")],
        )],
        "
        UNLINK order:7
        UNLINK order:7:summary
    ",
    );
}

#[test]
fn refresh_key_that_moves_deletes_the_old_rendering() {
    let mapping = r#"
        [[table]]
        name = "orders"
        tags = ["user:{user_id}"]
        [[table.refresh]]
        key = "user:{user_id}:last_order"
        columns = ["id"]
    "#;
    let old = [("id", "7"), ("user_id", "1")];
    let new = [("id", "7"), ("user_id", "2")];
    check(
        mapping,
        &[update("orders", &old, &new)],
        r#"
        UNLINK user:1:last_order
        TAG user:1
        TAG user:2
        SET user:2:last_order {"id":7}
    "#,
    );
}

#[test]
fn refresh_with_unchanged_toast_falls_back_to_delete() {
    let mapping = r#"
        [[table]]
        name = "users"
        keys = ["user:{id}"]
        [[table.refresh]]
        key = "user:{id}:card"
        columns = ["id", "bio"]
    "#;
    let old = [("id", "1")];
    let new = [("id", "1"), ("bio", "TOAST")];
    check(
        mapping,
        &[update("users", &old, &new)],
        "
        UNLINK user:1
        UNLINK user:1:card
    ",
    );
}

#[test]
fn refresh_with_unchanged_toast_uses_the_full_old_row() {
    let mapping = r#"
        [[table]]
        name = "users"
        keys = ["user:{id}"]
        [[table.refresh]]
        key = "user:{id}:card"
        columns = ["id", "bio"]
    "#;
    let old = [("id", "1"), ("bio", "long text")];
    let new = [("id", "1"), ("bio", "TOAST")];
    check(
        mapping,
        &[update("users", &old, &new)],
        r#"
        UNLINK user:1
        SET user:1:card {"id":1,"bio":"long text"}
    "#,
    );
}

#[test]
fn refresh_ttl_with_jitter() {
    let mapping = r#"
        [[table]]
        name = "users"
        [[table.refresh]]
        key = "user:{id}"
        columns = ["id"]
        ttl = "15m"
        jitter = "12.5%"
    "#;
    check(
        mapping,
        &[insert("users", &[("id", "1")])],
        r#"SET user:1 {"id":1} EX 900 JITTER 12.5%"#,
    );
}

#[test]
fn refresh_json_keeps_types() {
    let mapping = r#"
        [[table]]
        name = "t"
        [[table.refresh]]
        key = "t:{id}"
        columns = ["id", "flag", "gone", "quote", "nan"]
    "#;
    let new = [
        ("id", "1"),
        ("flag", "false"),
        ("gone", "NULL"),
        ("quote", "say \"hi\""),
    ];
    let mut new = row(&new)
        .columns()
        .map(|(n, d)| (n.to_owned(), d.clone()))
        .collect::<Vec<_>>();
    new.push(("nan".into(), Datum::Number("NaN".into())));
    let new = Row::from_pairs(new.iter().map(|(n, d)| (n.as_str(), d.clone())));
    check(
        mapping,
        &[change("t", Op::Insert, None, Some(new))],
        r#"
        SET t:1 {"id":1,"flag":false,"gone":null,"quote":"say \"hi\"","nan":"NaN"}
    "#,
    );
}

#[test]
fn refresh_json_embeds_json_columns() {
    let mapping =
        "[[table]]\nname = \"t\"\n[[table.refresh]]\nkey = \"t:{id}\"\ncolumns = [\"doc\"]";
    let new = Row::from_pairs([
        ("id", Datum::Number("1".into())),
        ("doc", Datum::Json(r#"{"a": [1]}"#.into())),
    ]);
    check(
        mapping,
        &[change("t", Op::Insert, None, Some(new))],
        r#"SET t:1 {"doc":{"a": [1]}}"#,
    );
}

#[test]
fn refresh_with_null_new_key_deletes_only_the_old_key() {
    let mapping = r#"
        [[table]]
        name = "orders"
        keys = ["order:{id}"]
        [[table.refresh]]
        key = "user:{user_id}:last_order"
        columns = ["id"]
    "#;
    let old = [("id", "7"), ("user_id", "1")];
    let new = [("id", "7"), ("user_id", "NULL")];
    check(
        mapping,
        &[update("orders", &old, &new)],
        "
        UNLINK order:7
        UNLINK user:1:last_order
    ",
    );
}

// ---- batches: dedupe and order -----------------------------------------------

#[test]
fn dedupes_keys_across_a_batch() {
    let changes = [
        insert("orders", &[("id", "1"), ("user_id", "9")]),
        insert("orders", &[("id", "2"), ("user_id", "9")]),
        update(
            "orders",
            &[("id", "1"), ("user_id", "9")],
            &[("id", "1"), ("user_id", "9")],
        ),
    ];
    check(
        ORDERS,
        &changes,
        "
        UNLINK user:9:orders
        UNLINK order:1
        UNLINK order:2
        TAG user:9
    ",
    );
}

#[test]
fn refresh_then_delete_in_one_batch_deletes() {
    let row = [("id", "7"), ("status", "new"), ("total", "1")];
    check(
        ORDER_SUMMARY,
        &[insert("orders", &row), delete("orders", &row)],
        "
        UNLINK order:7
        UNLINK order:7:summary
    ",
    );
}

#[test]
fn delete_then_refresh_in_one_batch_refreshes_with_the_last_value() {
    let first = [("id", "7"), ("status", "new"), ("total", "1")];
    let second = [("id", "7"), ("status", "paid"), ("total", "2")];
    check(
        ORDER_SUMMARY,
        &[
            delete("orders", &first),
            insert("orders", &first),
            update("orders", &first, &second),
        ],
        r#"
        UNLINK order:7
        SET order:7:summary {"id":7,"status":"paid","total":2} EX 3600
    "#,
    );
}

#[test]
fn deletes_go_before_tags_and_refreshes_last_across_tables() {
    let mapping = format!("{ORDER_SUMMARY}\n[[table]]\nname = \"users\"\nkeys = [\"user:{{id}}\"]\ntags = [\"user:{{id}}\"]\n");
    let changes = [
        insert("orders", &[("id", "1"), ("status", "new"), ("total", "5")]),
        insert("users", &[("id", "3")]),
    ];
    check(
        &mapping,
        &changes,
        r#"
        UNLINK order:1
        UNLINK user:3
        TAG user:3
        SET order:1:summary {"id":1,"status":"new","total":5} EX 3600
    "#,
    );
}

// ---- TRUNCATE ----------------------------------------------------------------

#[test]
fn truncate_deletes_every_key_pattern_and_tag_pattern() {
    check(
        ORDERS,
        &[truncate("orders")],
        "
        UNLINK MATCH user:*:orders
        UNLINK MATCH order:*
        TAG MATCH user:*
    ",
    );
}

#[test]
fn truncate_patterns_escape_literal_globs() {
    let mapping = "[[table]]\nname = \"t\"\nkeys = [\"a*[b]?:{id}\"]";
    check(mapping, &[truncate("t")], r"UNLINK MATCH a\*\[b\]\?:*");
}

#[test]
fn truncate_after_a_refresh_in_the_batch_wins() {
    let row = [("id", "7"), ("status", "new"), ("total", "1")];
    check(
        ORDER_SUMMARY,
        &[insert("orders", &row), truncate("orders")],
        "
        UNLINK order:7
        UNLINK order:7:summary
        UNLINK MATCH order:*
        UNLINK MATCH order:*:summary
    ",
    );
}

#[test]
fn insert_after_truncate_keeps_its_refresh() {
    let row = [("id", "8"), ("status", "new"), ("total", "1")];
    check(
        ORDER_SUMMARY,
        &[truncate("orders"), insert("orders", &row)],
        r#"
        UNLINK order:8
        UNLINK MATCH order:*
        UNLINK MATCH order:*:summary
        SET order:8:summary {"id":8,"status":"new","total":1} EX 3600
    "#,
    );
}

// ---- values that are not there ------------------------------------------------

#[test]
fn missing_old_values_fall_back_to_a_pattern_over_that_placeholder() {
    // REPLICA IDENTITY DEFAULT: the old row holds only the key column.
    let old = [("id", "7")];
    let new = [("id", "7"), ("user_id", "2")];
    check(
        ORDERS,
        &[update("orders", &old, &new)],
        "
        UNLINK user:2:orders
        UNLINK order:7
        UNLINK MATCH user:*:orders
        TAG user:2
        TAG MATCH user:*
    ",
    );
}

#[test]
fn unknown_values_keep_known_parts_of_the_pattern() {
    let mapping = "[[table]]\nname = \"t\"\nkeys = [\"t:{a}:{b}\"]";
    check(
        mapping,
        &[update("t", &[("a", "x:y")], &[("a", "x:y"), ("b", "2")])],
        r"
        UNLINK t:x%3Ay:2
        UNLINK MATCH t:x%3Ay:*
    ",
    );
}

#[test]
fn unchanged_toast_in_a_key_without_old_value_is_a_pattern() {
    check(
        KEY_ONLY,
        &[update(
            "things",
            &[("id", "1")],
            &[("id", "1"), ("v", "TOAST")],
        )],
        "UNLINK MATCH thing:*",
    );
}

#[test]
fn key_longer_than_the_limit_falls_back_to_the_pattern() {
    let limits = Limits {
        max_key_bytes: 20,
        ..Limits::default()
    };
    check_with(
        KEY_ONLY,
        limits,
        &[
            insert("things", &[("v", "0123456789abcdefghij")]),
            insert("things", &[("v", "ok")]),
        ],
        "
        UNLINK thing:ok
        UNLINK MATCH thing:*
    ",
    );
}

#[test]
fn null_wins_over_unknown_in_one_key() {
    let mapping = "[[table]]\nname = \"t\"\nkeys = [\"t:{a}:{b}\", \"t:{a}\"]";
    check(
        mapping,
        &[insert("t", &[("a", "1"), ("b", "NULL"), ("c", "TOAST")])],
        "UNLINK t:1",
    );
    check(
        mapping,
        &[delete("t", &[("b", "NULL")])],
        "UNLINK MATCH t:*",
    );
}

#[test]
fn origins_point_at_the_rule() {
    let mappings = mapping::load_str("m/orders.toml", ORDERS, Limits::default()).expect("loads");
    let plan = plan_changes(
        &mappings,
        &[insert("orders", &[("id", "7"), ("user_id", "1")])],
        &mut Output::default(),
    );
    let origins: Vec<String> = plan
        .commands
        .iter()
        .map(|command| mappings.origin(command.origin()).file_line())
        .collect();
    assert_eq!(
        origins,
        ["m/orders.toml:4", "m/orders.toml:4", "m/orders.toml:5"]
    );
}

// ---- namespace versions -----------------------------------------------------

const VERSIONED: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}"]
versions = ["user:{user_id}"]
"#;

#[test]
fn a_change_bumps_the_namespaces_of_its_old_and_new_row_once_per_batch() {
    check(
        VERSIONED,
        &[
            insert("orders", &[("id", "7"), ("user_id", "1")]),
            update(
                "orders",
                &[("id", "7"), ("user_id", "1")],
                &[("id", "7"), ("user_id", "2")],
            ),
        ],
        "
        UNLINK order:7
        BUMP evictd:ns:user:1
        BUMP evictd:ns:user:2
    ",
    );
}

#[test]
fn an_unknown_namespace_value_or_truncate_bumps_by_pattern() {
    check(
        VERSIONED,
        &[delete("orders", &[("id", "7")]), truncate("orders")],
        "
        UNLINK order:7
        UNLINK MATCH order:*
        BUMP MATCH evictd:ns:user:*
    ",
    );
}

// ---- conditions and key tables ---------------------------------------------

const CONDITIONAL: &str = r#"
[[table]]
name = "orders"
when = "status <> 'draft'"
keys = [
    "order:{id}",
    { template = "user:{user_id}:big_orders", when = "total > 100" },
]
tags = ["user:{user_id}"]

[[table.key]]
template = "listing:{user_id}"
changed = ["status", "user_id"]

[[table.refresh]]
key = "order:{id}:card"
columns = ["id", "total"]
when = "total >= 50 and note is null"
"#;

fn order(
    id: &str,
    user: &str,
    status: &str,
    total: &str,
    note: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("id", id.to_owned()),
        ("user_id", user.to_owned()),
        ("status", status.to_owned()),
        ("total", total.to_owned()),
        ("note", note.to_owned()),
    ]
}

fn pairs<'a>(row: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    row.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn an_entry_condition_skips_row_versions_that_do_not_match() {
    // A draft matches nothing: no command at all.
    check(
        CONDITIONAL,
        &[insert(
            "orders",
            &pairs(&order("1", "5", "draft", "500", "NULL")),
        )],
        "",
    );
    // Leaving the condition invalidates what the old row rendered; the new
    // row renders nothing.
    check(
        CONDITIONAL,
        &[update(
            "orders",
            &pairs(&order("1", "5", "paid", "500", "NULL")),
            &pairs(&order("1", "5", "draft", "500", "NULL")),
        )],
        "
        UNLINK order:1
        UNLINK user:5:big_orders
        UNLINK listing:5
        UNLINK order:1:card
        TAG user:5
    ",
    );
    // Entering it: only the new row's keys, and its refresh is written.
    check(
        CONDITIONAL,
        &[update(
            "orders",
            &pairs(&order("1", "5", "draft", "500", "NULL")),
            &pairs(&order("1", "6", "paid", "500", "NULL")),
        )],
        r#"
        UNLINK order:1
        UNLINK user:6:big_orders
        UNLINK listing:6
        TAG user:6
        SET order:1:card {"id":1,"total":500}
    "#,
    );
}

#[test]
fn a_key_condition_is_evaluated_on_the_old_and_the_new_row_separately() {
    // total 500 -> 20 and user 5 -> 6: the old row matches `total > 100`
    // (user 5's key goes), the new one does not (user 6's stays).
    check(
        CONDITIONAL,
        &[update(
            "orders",
            &pairs(&order("1", "5", "paid", "500", "NULL")),
            &pairs(&order("1", "6", "paid", "20", "NULL")),
        )],
        "
        UNLINK order:1
        UNLINK user:5:big_orders
        UNLINK listing:5
        UNLINK listing:6
        UNLINK order:1:card
        TAG user:5
        TAG user:6
    ",
    );
}

#[test]
fn a_key_with_its_own_changed_is_skipped_by_updates_that_leave_them_alone() {
    // Only the total changed: listing:5 (changed = status, user_id) stays.
    check(
        CONDITIONAL,
        &[update(
            "orders",
            &pairs(&order("1", "5", "paid", "500", "NULL")),
            &pairs(&order("1", "5", "paid", "600", "NULL")),
        )],
        r#"
        UNLINK order:1
        UNLINK user:5:big_orders
        TAG user:5
        SET order:1:card {"id":1,"total":600}
    "#,
    );
}

#[test]
fn a_refresh_condition_writes_only_a_matching_new_row() {
    // A note appears: the refresh's condition no longer holds, so the key
    // is deleted instead of written (and listing:5, whose `changed`
    // columns stayed, is left alone).
    check(
        CONDITIONAL,
        &[update(
            "orders",
            &pairs(&order("1", "5", "paid", "60", "NULL")),
            &pairs(&order("1", "5", "paid", "60", "gift")),
        )],
        "
        UNLINK order:1
        UNLINK order:1:card
        TAG user:5
    ",
    );
    // Neither row matches: the refresh does nothing.
    check(
        CONDITIONAL,
        &[insert(
            "orders",
            &pairs(&order("2", "5", "paid", "10", "NULL")),
        )],
        "
        UNLINK order:2
        UNLINK listing:5
        TAG user:5
    ",
    );
}

#[test]
fn a_condition_on_a_value_the_change_does_not_carry_is_taken_as_true() {
    // The old row under REPLICA IDENTITY DEFAULT holds only the key: its
    // status is unknown, so the entry acts on it (never miss an
    // invalidation); the new draft does not match.
    let old = row(&[("id", "1")]);
    let new = row(&pairs(&order("1", "5", "draft", "500", "NULL")));
    let mut output = Output::with_notes();
    let mappings = mapping::load_str("test.toml", CONDITIONAL, Limits::default()).unwrap();
    mappings.eval(
        &change("orders", Op::Update, Some(old.clone()), Some(new.clone())),
        &mut output,
    );
    let notes: Vec<String> = output
        .notes
        .iter()
        .map(|n| format!("{:?}", n.kind))
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("ConditionUnknown") && n.contains("status")),
        "{notes:?}"
    );
    check(
        CONDITIONAL,
        &[change("orders", Op::Update, Some(old), Some(new))],
        "
        UNLINK order:1
        UNLINK order:1:card
        UNLINK MATCH user:*:big_orders
        UNLINK MATCH listing:*
        TAG MATCH user:*
    ",
    );
}

// ---- prefixes ----------------------------------------------------------------

const PREFIXED: &str = r#"
[[table]]
name = "users"
keys = ["user:{id}"]
prefixes = ["user:{id}:", "team:{team_id}:user:{id}:"]
"#;

#[test]
fn a_prefix_deletes_every_key_under_the_rendered_prefix() {
    check(
        PREFIXED,
        &[update(
            "users",
            &[("id", "7"), ("team_id", "1")],
            &[("id", "7"), ("team_id", "2")],
        )],
        "
        UNLINK user:7
        UNLINK MATCH user:7:*
        UNLINK MATCH team:1:user:7:*
        UNLINK MATCH team:2:user:7:*
    ",
    );
}

#[test]
fn a_prefix_escapes_glob_characters_skips_nulls_and_widens_unknowns() {
    check(
        PREFIXED,
        &[insert("users", &[("id", "a*b"), ("team_id", "NULL")])],
        "
        UNLINK a%2Ab
        UNLINK MATCH user:a%2Ab:*
    "
        .replace("UNLINK a%2Ab", "UNLINK user:a%2Ab")
        .as_str(),
    );
    check(
        PREFIXED,
        &[delete("users", &[("id", "7"), ("team_id", "TOAST")])],
        "
        UNLINK user:7
        UNLINK MATCH user:7:*
        UNLINK MATCH team:*:user:7:*
    ",
    );
    check(
        PREFIXED,
        &[truncate("users")],
        "
        UNLINK MATCH user:*
        UNLINK MATCH user:*:*
        UNLINK MATCH team:*:user:*:*
    ",
    );
}

// ---- transforms and json paths ---------------------------------------------

const TRANSFORMED: &str = r#"
[[table]]
name = "products"
keys = [
    "product:email:{email|lower}",
    "product:sku:{sku|upper}",
    "product:name:{name|trim}",
    "product:day:{created_at|date}",
    "product:hour:{created_at|hour}",
    "product:month:{created_at|month}",
    "product:slug:{payload.slug}",
    "product:item:{payload.items.0.id}",
    "product:title:{title|hash}",
]
"#;

fn product(payload: &str, created_at: &str) -> Row {
    let mut pairs: Vec<(&str, Datum)> = vec![
        ("email", Datum::text("Ann@Example.COM")),
        ("sku", Datum::text("ab-12")),
        ("name", Datum::text("  Red shoes ")),
        ("created_at", datum(created_at)),
        ("title", Datum::text("hello")),
    ];
    pairs.push(("payload", Datum::Json(payload.into())));
    Row::from_pairs(pairs)
}

#[test]
fn transforms_and_json_paths_render_what_they_say() {
    let row = product(
        r#"{"slug": "red-shoes", "items": [{"id": 42}, {"id": 7}]}"#,
        "2024-01-31 12:34:56.5+00",
    );
    check(
        TRANSFORMED,
        &[change("products", Op::Insert, None, Some(row))],
        "
        UNLINK product:email:ann@example.com
        UNLINK product:sku:AB-12
        UNLINK product:name:Red%20shoes
        UNLINK product:day:2024-01-31
        UNLINK product:hour:2024-01-31%2012
        UNLINK product:month:2024-01
        UNLINK product:slug:red-shoes
        UNLINK product:item:42
        UNLINK product:title:a430d84680aabd0b
    ",
    );
}

#[test]
fn a_missing_json_path_or_a_value_that_is_no_date_renders_no_key() {
    // No `slug`, an empty `items`, and a created_at that is not a
    // timestamp: those keys do not exist, like a NULL placeholder's.
    let row = product(r#"{"items": []}"#, "soon");
    check(
        TRANSFORMED,
        &[change("products", Op::Insert, None, Some(row))],
        "
        UNLINK product:email:ann@example.com
        UNLINK product:sku:AB-12
        UNLINK product:name:Red%20shoes
        UNLINK product:title:a430d84680aabd0b
    ",
    );
}

#[test]
fn an_unknown_value_under_a_transform_widens_to_its_pattern() {
    let mut row = product(r#"{"slug": "x"}"#, "2024-01-31");
    row = Row::from_pairs(
        row.columns()
            .map(|(name, value)| match name {
                "email" | "payload" => (name, Datum::UnchangedToast),
                _ => (name, value.clone()),
            })
            .collect::<Vec<_>>(),
    );
    check(
        TRANSFORMED,
        &[change("products", Op::Delete, Some(row), None)],
        "
        UNLINK product:sku:AB-12
        UNLINK product:name:Red%20shoes
        UNLINK product:day:2024-01-31
        UNLINK product:month:2024-01
        UNLINK product:title:a430d84680aabd0b
        UNLINK MATCH product:email:*
        UNLINK MATCH product:slug:*
        UNLINK MATCH product:item:*
    ",
    );
}
