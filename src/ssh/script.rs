//! Shell scripts for remote hosts, built one way only: a `'static` template whose `{name}`
//! placeholders are filled with `Quoted` values, and a `Quoted` is made only by `quote`.
//! Nothing from a spec, etcd or a host can reach a remote shell unquoted, because no other
//! way to build a `Script` exists and `Session::run` takes nothing else.

use std::fmt;

/// A value quoted for a POSIX shell (one word, taken literally).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quoted(String);

impl fmt::Display for Quoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Quote `s` for a POSIX shell: bare when it holds only characters no shell treats
/// specially, otherwise in single quotes (a `'` inside becomes `'\''`).
pub fn quote(s: &str) -> Quoted {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=@%+,".contains(c))
    {
        return Quoted(s.to_string());
    }
    Quoted(format!("'{}'", s.replace('\'', r"'\''")))
}

/// Several values, each quoted on its own, as separate words.
pub fn quote_words<'a>(items: impl IntoIterator<Item = &'a str>) -> Quoted {
    Quoted(
        items
            .into_iter()
            .map(|i| quote(i).0)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// A script ready for a remote shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script(String);

impl Script {
    /// Fill `template`'s `{name}` placeholders (not `${…}`: that is the shell's) with the
    /// quoted values. A placeholder without a value, or a value without a placeholder, is a
    /// bug in the template: it panics in tests, which render every script.
    pub fn render(template: &'static str, args: &[(&str, &Quoted)]) -> Script {
        let mut out = String::with_capacity(template.len() + 64);
        let mut used = vec![false; args.len()];
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let (before, after) = rest.split_at(open);
            out.push_str(before);
            let shell_brace = before.ends_with('$');
            let close = after.find('}');
            let name = close.map(|c| &after[1..c]);
            match (shell_brace, name) {
                (false, Some(name)) if is_name(name) => {
                    let Some(i) = args.iter().position(|(n, _)| *n == name) else {
                        panic!("script template: no value for {{{name}}}");
                    };
                    used[i] = true;
                    out.push_str(&args[i].1.0);
                    rest = &after[name.len() + 2..];
                }
                _ => {
                    out.push('{');
                    rest = &after[1..];
                }
            }
        }
        out.push_str(rest);
        if let Some(i) = used.iter().position(|u| !u) {
            panic!("script template: {{{}}} given but not used", args[i].0);
        }
        Script(out)
    }

    pub fn text(&self) -> &str {
        &self.0
    }

    /// This script as one quoted word (to hand to `sh -c` through sudo).
    pub fn quoted(&self) -> Quoted {
        quote(&self.0)
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_take_quoted_values_and_leave_the_shell_alone() {
        let dir = quote("/srv/a b");
        let s = Script::render(
            "mkdir -p {dir} && echo ${HOME} {x} $((1+1)) {not a name}",
            &[("dir", &dir), ("x", &quote("it's"))],
        );
        assert_eq!(
            s.text(),
            r"mkdir -p '/srv/a b' && echo ${HOME} 'it'\''s' $((1+1)) {not a name}"
        );
    }

    #[test]
    #[should_panic(expected = "no value for {dir}")]
    fn a_missing_value_is_a_bug() {
        let _ = Script::render("ls {dir}", &[]);
    }

    #[test]
    #[should_panic(expected = "{extra} given but not used")]
    fn an_unused_value_is_a_bug() {
        let _ = Script::render("ls", &[("extra", &quote("x"))]);
    }

    #[test]
    fn quoting() {
        for (raw, quoted) in [
            ("plain/path-1.2", "plain/path-1.2"),
            ("", "''"),
            ("a b", "'a b'"),
            ("it's", r"'it'\''s'"),
            ("$(x)", "'$(x)'"),
            ("`x`", "'`x`'"),
            ("a\nb", "'a\nb'"),
        ] {
            assert_eq!(quote(raw).to_string(), quoted, "{raw:?}");
        }
    }
}
