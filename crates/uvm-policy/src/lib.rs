//! The guest's security policy: a Rego module that decides every host request the agent
//! serves, as hcsshim's confidential policy and Kata's `SetPolicy` do, evaluated with the
//! `regorus` interpreter.
//!
//! * The **base policy** is one module in package [`BASE_PACKAGE`] (`uvmctl.policy`). For each
//!   [`Rule`] it may define a rule of that name; a request is allowed only when the rule is
//!   exactly `true`. A rule that is missing, undefined for the input, `false`, anything but a
//!   boolean, or that fails to evaluate denies (fail closed).
//! * **Fragments** add: each is a module in a package of its own, outside the base's. A request
//!   the base policy denies is allowed when a fragment's rule of the same name is `true`.
//!   Fragments never change what the base allows: they are evaluated apart from it, in
//!   packages that can neither hold nor shadow the base's rules. Loading one is itself decided
//!   by the base policy's `load_fragment` rule (input: the fragment's `package` and `sha256`),
//!   so a policy that defines none accepts no fragments.
//!
//! The input document of each rule is documented on [`Rule`] and in `docs/policy.md`; the
//! agent builds it from the request. [`Policy::compile`] is what the host runs before a VM
//! boots, so a policy that does not parse fails the create with the compiler's message.

use std::collections::BTreeSet;

use regorus::{Engine, Value};

/// A policy's identity as `inspect` shows it: the SHA-256 of its text, lower-case hex (what a
/// confidential VM would measure).
pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The package of the base policy.
pub const BASE_PACKAGE: &str = "uvmctl.policy";

/// A host request class the policy decides, named as its Rego rule.
///
/// Requests that only read the agent's own state or act on a process the policy already let
/// start are not decided: handshake, stats, output reads, waits, stdin, terminal resizes, file
/// handles already opened, disk ejects (the step before the host pulls the device, which it
/// can do anyway), and shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// Start a process. Input: `args` (argv), `program` (the last component of `args[0]`),
    /// `path` (the file the agent will execute, resolved in the process's `PATH`; `args[0]`
    /// when nothing of that name is found), `dir` (the directory of `path`, `""` for none), `env`
    /// (`KEY=VALUE` strings), `cwd` (`"/"` when the request leaves it empty), `terminal`,
    /// `stdin` (booleans).
    Exec,
    /// Signal a process the agent started. Input: `exec_id`, `signal` (number), and the
    /// process's `args`, `program`.
    Signal,
    /// Mount a disk. Input: `guest_path`, `read_only`, `fs_type` (`""` when probed),
    /// `options`, `partition`, and `location`: `{"scsi": {"controller": C, "lun": L}}` or
    /// `{"virtio_blk_serial": S}`.
    MountDisk,
    /// Unmount a disk. Input: `guest_path`.
    UnmountDisk,
    /// Mount a share. Input: `tag`, `transport` (`"virtiofs"` or `"9p"`), `guest_path`,
    /// `read_only`.
    MountShare,
    /// Unmount a share. Input: `guest_path`.
    UnmountShare,
    /// Write a file into the guest (copy in). Input: `path`, `mode`, `size`.
    WriteFile,
    /// Read a file out of the guest (copy out). Input: `path`, `max_size`.
    ReadFile,
    /// Dump the agent's and its processes' stacks. Input: `{}`.
    DumpStacks,
    /// Load a policy fragment (base policy only). Input: `package`, `sha256` (of the
    /// fragment's text, lower-case hex: a policy can accept exactly the fragments it names).
    LoadFragment,
}

impl Rule {
    /// Every rule.
    pub const ALL: [Rule; 10] = [
        Rule::Exec,
        Rule::Signal,
        Rule::MountDisk,
        Rule::UnmountDisk,
        Rule::MountShare,
        Rule::UnmountShare,
        Rule::WriteFile,
        Rule::ReadFile,
        Rule::DumpStacks,
        Rule::LoadFragment,
    ];

    /// The Rego rule's name.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Exec => "exec",
            Rule::Signal => "signal",
            Rule::MountDisk => "mount_disk",
            Rule::UnmountDisk => "unmount_disk",
            Rule::MountShare => "mount_share",
            Rule::UnmountShare => "unmount_share",
            Rule::WriteFile => "write_file",
            Rule::ReadFile => "read_file",
            Rule::DumpStacks => "dump_stacks",
            Rule::LoadFragment => "load_fragment",
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a policy or fragment was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The module does not parse or prepare; `message` is the interpreter's, with the line.
    #[error("{what} does not compile: {message}")]
    Compile {
        /// "the policy" or "the fragment".
        what: &'static str,
        /// The interpreter's message.
        message: String,
    },
    /// The base module is in another package.
    #[error("the policy is in package {found:?}; a base policy must be `package {BASE_PACKAGE}`")]
    BasePackage {
        /// The package it declares.
        found: String,
    },
    /// A fragment in the base policy's package, under it, or above it.
    #[error(
        "a fragment in package {package:?} would share the base policy's package \
         ({BASE_PACKAGE}); a fragment needs a package of its own"
    )]
    FragmentPackage {
        /// The fragment's package.
        package: String,
    },
    /// A fragment for a package that already has a different one.
    #[error("a different fragment is loaded for package {package:?}; fragments only add")]
    FragmentExists {
        /// The fragment's package.
        package: String,
    },
    /// The base policy's `load_fragment` rule did not allow it.
    #[error("the policy's load_fragment rule does not allow a fragment in package {package:?}{}",
        reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    FragmentRefused {
        /// The fragment's package.
        package: String,
        /// Why evaluating the rule failed, when it did.
        reason: Option<String>,
    },
}

/// A request the policy denied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("denied by policy rule {BASE_PACKAGE}.{rule}: {reason}")]
pub struct Denial {
    /// The rule that decided.
    pub rule: Rule,
    /// "no rule allows it", or the evaluation error.
    pub reason: String,
}

/// What loading a fragment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragmentLoad {
    /// The fragment is in force now.
    Added,
    /// The very same fragment was in force already (a retry).
    AlreadyLoaded,
}

/// One loaded module: its package and the rules it declares.
#[derive(Debug, Clone)]
struct Module {
    package: String,
    source: String,
    text: String,
    rules: BTreeSet<Rule>,
}

/// A compiled policy with its fragments, ready to decide.
#[derive(Debug, Clone)]
pub struct Policy {
    engine: Engine,
    base: Module,
    fragments: Vec<Module>,
}

impl Policy {
    /// Compiles a base policy: it must parse, prepare, and be `package uvmctl.policy`.
    pub fn compile(text: &str) -> Result<Policy, PolicyError> {
        let mut engine = Engine::new();
        let base = load(&mut engine, "policy.rego", text, "the policy")?;
        if base.package != BASE_PACKAGE {
            return Err(PolicyError::BasePackage {
                found: base.package,
            });
        }
        Ok(Policy {
            engine,
            base,
            fragments: Vec::new(),
        })
    }

    /// The base policy's text.
    pub fn text(&self) -> &str {
        &self.base.text
    }

    /// The packages of the fragments in force, in load order.
    pub fn fragments(&self) -> impl Iterator<Item = &str> {
        self.fragments.iter().map(|f| f.package.as_str())
    }

    /// Adds a fragment, when it compiles, sits in a package of its own and the base policy's
    /// `load_fragment` rule allows it. On any error the policy is unchanged.
    pub fn add_fragment(&mut self, text: &str) -> Result<FragmentLoad, PolicyError> {
        let package = fragment_package(text)?;
        if let Some(loaded) = self.fragments.iter().find(|f| f.package == package) {
            return if loaded.text == text {
                Ok(FragmentLoad::AlreadyLoaded)
            } else {
                Err(PolicyError::FragmentExists { package })
            };
        }
        let input =
            Value::from(serde_json::json!({ "package": package, "sha256": sha256_hex(text) }));
        match eval(&mut self.engine, &self.base, Rule::LoadFragment, &input) {
            Ok(true) => {}
            Ok(false) => {
                return Err(PolicyError::FragmentRefused {
                    package,
                    reason: None,
                })
            }
            Err(reason) => {
                return Err(PolicyError::FragmentRefused {
                    package,
                    reason: Some(reason),
                })
            }
        }
        let mut next = self.engine.clone();
        let source = format!("fragment-{}.rego", self.fragments.len() + 1);
        let module = load(&mut next, &source, text, "the fragment")?;
        self.engine = next;
        self.fragments.push(module);
        Ok(FragmentLoad::Added)
    }

    /// Decides a request of class `rule` with `input` (the documented input document):
    /// allowed when the base policy's rule, or a fragment's, is `true`.
    pub fn decide(&mut self, rule: Rule, input: &serde_json::Value) -> Result<(), Denial> {
        let input = Value::from(input.clone());
        let mut failure = None;
        let fragments = self.fragments.iter().filter(|_| rule != Rule::LoadFragment);
        for module in std::iter::once(&self.base).chain(fragments) {
            match eval(&mut self.engine, module, rule, &input) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        Err(Denial {
            rule,
            reason: failure.unwrap_or_else(|| "no rule allows it".to_owned()),
        })
    }
}

/// Whether `module`'s `rule` is exactly `true` for `input`; an evaluation error as text.
fn eval(engine: &mut Engine, module: &Module, rule: Rule, input: &Value) -> Result<bool, String> {
    if !module.rules.contains(&rule) {
        return Ok(false);
    }
    engine.set_input(input.clone());
    let value = engine
        .eval_rule(format!("data.{}.{}", module.package, rule.name()))
        .map_err(|e| format!("{} in {}: {e}", rule.name(), module.source))?;
    Ok(value == Value::Bool(true))
}

/// A fragment's package, checked to be outside the base policy's: compiled on its own (so a
/// fragment that does not compile is refused before anything else).
fn fragment_package(text: &str) -> Result<String, PolicyError> {
    let mut alone = Engine::new();
    let module = load(&mut alone, "fragment.rego", text, "the fragment")?;
    let package = module.package;
    let overlaps = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}."));
    if overlaps(&package, BASE_PACKAGE) || overlaps(BASE_PACKAGE, &package) {
        return Err(PolicyError::FragmentPackage { package });
    }
    Ok(package)
}

/// Adds `text` to `engine` as `source` and prepares every module (which finds conflicts and
/// malformed built-in calls the parser does not), returning what it declares.
fn load(
    engine: &mut Engine,
    source: &str,
    text: &str,
    what: &'static str,
) -> Result<Module, PolicyError> {
    let compile = |e: anyhow::Error| PolicyError::Compile {
        what,
        message: e.to_string(),
    };
    engine
        .add_policy(source.to_owned(), text.to_owned())
        .map_err(compile)?;
    engine.set_input(Value::new_object());
    engine.eval_modules(false).map_err(compile)?;
    // The package as the evaluator sees it (escapes decoded, quoted parts whole), and plain
    // identifiers only: a quoted or escaped part (`uvmctl["p\u006flicy"]`) would otherwise be
    // one package to these checks and another to the evaluator.
    let components = engine
        .get_policy_package_components()
        .map_err(compile)?
        .into_iter()
        .find(|p| p.source_file == source)
        .map(|p| p.components)
        .unwrap_or_default();
    let plain = |c: &String| {
        c.chars()
            .next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
    };
    if components.is_empty() || !components.iter().all(plain) {
        return Err(PolicyError::Compile {
            what,
            message: format!(
                "package {components:?}: each part of a package name must be a plain identifier"
            ),
        });
    }
    let package = components.join(".");
    let mut rules = BTreeSet::new();
    for rule in Rule::ALL {
        if engine
            .has_declared_rule_rooted_at(source, rule.name())
            .map_err(compile)?
        {
            rules.insert(rule);
        }
    }
    Ok(Module {
        package,
        source: source.to_owned(),
        text: text.to_owned(),
        rules,
    })
}

#[cfg(test)]
mod tests;
