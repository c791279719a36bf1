//! End to end through real WAL: Postgres commits, evictd streams the slot,
//! Redis loses exactly the keys the mappings name.

mod support;

use support::Streaming;

const SHOP: &str = "
    create table users (id bigint primary key, email text not null, bio text);
    create table orders (id bigint primary key, user_id bigint not null, status text not null);
    alter table users replica identity full;
    alter table orders replica identity full;
    create publication evictd for table users, orders;
";

const USERS: &str = r#"
[[table]]
name = "users"
keys = ["user:{id}", "user:email:{email}"]
"#;

const ORDERS: &str = r#"
[[table]]
name = "orders"
keys = ["order:{id}", "user:{user_id}:orders"]
"#;

#[tokio::test]
async fn insert_update_delete_on_several_tables() {
    let mut s = Streaming::start(SHOP, &[("users.toml", USERS), ("orders.toml", ORDERS)]).await;
    let keys = ["user:1", "user:email:a@x.io", "order:10", "user:1:orders", "user:2", "order:11"];
    s.seed(&keys).await;
    s.db.execute("insert into users values (1, 'a@x.io', null)").await;
    s.db.execute("insert into orders values (10, 1, 'new')").await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["user:2", "order:11"]);
    s.seed(&keys).await;
    s.db.execute("update orders set status = 'paid' where id = 10").await;
    s.db.execute("delete from users where id = 1").await;
    s.sync().await;
    assert_eq!(s.cached(&keys).await, ["user:2", "order:11"]);
}
