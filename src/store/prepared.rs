//! [`Prepared`]: raw SQL that each connection prepares once and reuses.
//!
//! diesel's `sql_query` never lets its statement be cached, so Postgres
//! parses, analyses and plans it on every call, and the driver spends a
//! round trip preparing it first. The hot path's statements bind one array
//! per column (`unnest`), so their text is the same for a batch of any
//! size: prepared once per connection, each later call is a single round
//! trip that Postgres only executes. Measured on the benchmark: parsing and
//! planning took about a tenth of Postgres's time at 45,000 tasks/s.

use std::borrow::Cow;
use std::marker::PhantomData;
use std::ops::Range;

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};
use diesel::{QueryResult, result::Error};

/// A statement of raw SQL with `$1`, `$2`… placeholders, each used once and
/// in order, bound with [`bind`](Self::bind) in that order. Unlike diesel's
/// `sql_query`, its text is the key of the connection's statement cache.
pub(crate) struct Prepared<'a> {
    sql: Cow<'a, str>,
    /// Where in `sql` the text between the placeholders is: one more part
    /// than placeholders.
    parts: Vec<Range<usize>>,
    binds: Vec<Box<dyn QueryFragment<Pg> + Send + 'a>>,
}

/// One bound value and its SQL type.
struct Bound<ST, V> {
    value: V,
    sql_type: PhantomData<fn() -> ST>,
}

impl<ST, V> QueryFragment<Pg> for Bound<ST, V>
where
    Pg: HasSqlType<ST>,
    V: ToSql<ST, Pg>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_bind_param::<ST, V>(&self.value)
    }
}

impl<'a> Prepared<'a> {
    /// The statement `sql`. Its placeholders must be `$1` to `$n`, each once,
    /// in order of appearance: diesel numbers the binds as it writes them.
    pub(crate) fn new(sql: impl Into<Cow<'a, str>>) -> Self {
        let sql = sql.into();
        let mut parts = Vec::new();
        let mut start = 0;
        for next in 1.. {
            let placeholder = format!("${next}");
            // `$1` must not be taken for the start of `$10`.
            let found = sql[start..].match_indices(&placeholder).find(|(at, _)| {
                let after = start + at + placeholder.len();
                !sql[after..].starts_with(|c: char| c.is_ascii_digit())
            });
            let Some((at, _)) = found else { break };
            parts.push(start..start + at);
            start += at + placeholder.len();
        }
        parts.push(start..sql.len());
        Self {
            sql,
            parts,
            binds: Vec::new(),
        }
    }

    /// Binds the value of the next placeholder.
    pub(crate) fn bind<ST, V>(mut self, value: V) -> Self
    where
        Pg: HasSqlType<ST>,
        V: ToSql<ST, Pg> + Send + 'a,
        ST: 'a,
    {
        self.binds.push(Box::new(Bound {
            value,
            sql_type: PhantomData,
        }));
        self
    }
}

impl QueryFragment<Pg> for Prepared<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        if self.parts.len() != self.binds.len() + 1 {
            return Err(Error::QueryBuilderError(
                format!(
                    "a prepared statement has {} placeholders in order but {} values bound",
                    self.parts.len() - 1,
                    self.binds.len()
                )
                .into(),
            ));
        }
        out.push_sql(&self.sql[self.parts[0].clone()]);
        for (bind, part) in self.binds.iter().zip(&self.parts[1..]) {
            bind.walk_ast(out.reborrow())?;
            out.push_sql(&self.sql[part.clone()]);
        }
        Ok(())
    }
}

impl QueryId for Prepared<'_> {
    type QueryId = ();
    // Cached by its SQL text, not by type.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Prepared<'_> {
    type SqlType = Untyped;
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::sql_types::{Array, Integer, Text};

    fn sql_of(query: &Prepared<'_>) -> String {
        diesel::debug_query::<Pg, _>(query)
            .to_string()
            .split(" -- binds")
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn writes_the_sql_back_with_each_placeholder_in_its_place() {
        let sql = "SELECT $1::int + $2::int, $3, $4, $5, $6, $7, $8, $9, $10, $11 FROM t";
        let mut query = Prepared::new(sql);
        for n in 0..11 {
            query = query.bind::<Integer, _>(n);
        }
        assert_eq!(sql_of(&query), sql);
        let query = Prepared::new("SELECT u FROM unnest($1::text[]) AS u")
            .bind::<Array<Text>, _>(vec!["a".to_owned()]);
        assert_eq!(sql_of(&query), "SELECT u FROM unnest($1::text[]) AS u");
    }

    #[test]
    fn a_missing_bind_is_an_error_not_a_wrong_statement() {
        let query = Prepared::new("SELECT $1::int, $2::int").bind::<Integer, _>(1);
        let err = QueryFragment::<Pg>::to_sql(
            &query,
            &mut <Pg as diesel::backend::Backend>::QueryBuilder::default(),
            &Pg,
        )
        .expect_err("one value for two placeholders");
        assert!(err.to_string().contains("2 placeholders"), "{err}");
    }
}
