//! Roles: names to ids, role inclusion resolved at load time (cycles are config errors), and the
//! roles an identity holds (what its credential carries, plus static assignments).

use std::{collections::HashMap, sync::Arc};

use crate::{
    config::{
        model::{RoleAssignmentConfig, RoleConfig},
        ErrorSink,
    },
    policy::authn::Identity,
};

/// The configured roles with inclusion resolved.
#[derive(Debug, Default)]
pub struct RoleTable {
    ids: HashMap<Box<str>, u32>,
    names: Vec<Arc<str>>,
    /// Per role: the authentication methods whose credentials may confer it (`None`: any).
    conferred_by: Vec<Option<Box<[Box<str>]>>>,
    /// Per role: sorted ids of the roles that have it (itself and every role that includes it,
    /// directly or not).
    holders: Vec<Box<[u32]>>,
    assignments: Vec<Assignment>,
    by_subject: HashMap<Box<str>, Vec<usize>>,
    by_group: HashMap<Box<str>, Vec<usize>>,
}

#[derive(Debug)]
struct Assignment {
    providers: Box<[Box<str>]>,
    roles: Box<[u32]>,
}

impl RoleTable {
    /// Compiles roles and assignments; errors go to `sink` under `authorization.…`.
    pub fn compile(
        roles: &[RoleConfig],
        assignments: &[RoleAssignmentConfig],
        sink: &mut ErrorSink<'_>,
    ) -> Self {
        let mut table = Self::default();
        for (i, role) in roles.iter().enumerate() {
            if role.name.is_empty() || role.name.contains([',', ' ']) {
                sink.error(
                    format!("authorization.roles[{i}].name"),
                    "a role name is non-empty without commas or spaces (roles travel upstream comma-separated)",
                );
            }
            let id = table.names.len() as u32;
            if table.ids.insert(role.name.as_str().into(), id).is_some() {
                sink.error(
                    format!("authorization.roles[{i}].name"),
                    format!("role `{}` is defined twice", role.name),
                );
            }
            table.names.push(role.name.as_str().into());
            table.conferred_by.push(
                (!role.providers.is_empty())
                    .then(|| role.providers.iter().map(|p| p.as_str().into()).collect()),
            );
        }
        // inclusion edges by id; unknown names are reported and skipped
        let mut includes: Vec<Vec<u32>> = vec![Vec::new(); roles.len()];
        for (i, role) in roles.iter().enumerate() {
            for (j, name) in role.includes.iter().enumerate() {
                match table.ids.get(name.as_str()) {
                    Some(&id) => includes[i].push(id),
                    None => sink.error(
                        format!("authorization.roles[{i}].includes[{j}]"),
                        format!("no role is named `{name}`"),
                    ),
                }
            }
        }
        if let Some(cycle) = find_cycle(&includes) {
            let names: Vec<&str> = cycle
                .iter()
                .map(|&id| roles[id as usize].name.as_str())
                .collect();
            sink.error(
                format!("authorization.roles[{}].includes", cycle[0]),
                format!("roles include each other in a cycle: {}", names.join(" → ")),
            );
            // no closure over a cycle; the config is refused anyway
            includes.iter_mut().for_each(Vec::clear);
        }
        let mut holders: Vec<Vec<u32>> = vec![Vec::new(); roles.len()];
        for role in 0..roles.len() as u32 {
            for had in closure(role, &includes) {
                holders[had as usize].push(role);
            }
        }
        table.holders = holders
            .into_iter()
            .map(|mut h| {
                h.sort_unstable();
                h.dedup();
                h.into()
            })
            .collect();

        for (i, assignment) in assignments.iter().enumerate() {
            let path = format!("authorization.assignments[{i}]");
            if assignment.subjects.is_empty() && assignment.groups.is_empty() {
                sink.error(&path, "an assignment names `subjects` or `groups`");
            }
            let mut ids = Vec::new();
            for (j, name) in assignment.roles.iter().enumerate() {
                match table.ids.get(name.as_str()) {
                    Some(&id) => ids.push(id),
                    None => sink.error(
                        format!("{path}.roles[{j}]"),
                        format!("no role is named `{name}`"),
                    ),
                }
            }
            let index = table.assignments.len();
            table.assignments.push(Assignment {
                providers: assignment
                    .providers
                    .iter()
                    .map(|p| p.as_str().into())
                    .collect(),
                roles: ids.into(),
            });
            for subject in &assignment.subjects {
                table
                    .by_subject
                    .entry(subject.as_str().into())
                    .or_default()
                    .push(index);
            }
            for (j, group) in assignment.groups.iter().enumerate() {
                if table.ids.contains_key(group.as_str()) {
                    sink.error(
                        format!("{path}.groups[{j}]"),
                        format!("`{group}` is a role name: a credential naming it has that role already; name groups and roles apart"),
                    );
                }
                table
                    .by_group
                    .entry(group.as_str().into())
                    .or_default()
                    .push(index);
            }
        }
        table
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn id(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    pub fn name(&self, id: u32) -> &Arc<str> {
        &self.names[id as usize]
    }

    /// Names of every role the held roles amount to, inclusion expanded, in config order.
    pub fn expand(&self, held: &[u32]) -> Vec<&str> {
        (0..self.names.len() as u32)
            .filter(|&role| {
                held.iter()
                    .any(|h| self.holders(role).binary_search(h).is_ok())
            })
            .map(|role| &*self.names[role as usize])
            .collect()
    }

    /// Sorted ids of the roles that have role `id`.
    pub fn holders(&self, id: u32) -> &[u32] {
        &self.holders[id as usize]
    }

    /// The configured roles an identity holds directly: those its credential names (where the
    /// role trusts the identity's provider), and those assigned to its subject or to a group its
    /// credential names. Inclusion is not expanded
    /// here: permissions and route requirements list their holders instead.
    pub fn of(&self, identity: &Identity) -> Vec<u32> {
        let mut ids = Vec::with_capacity(identity.roles.len());
        for name in &identity.roles {
            let Some(id) = self.id(name) else { continue };
            let trusted = self.conferred_by[id as usize]
                .as_ref()
                .is_none_or(|providers| providers.iter().any(|p| **p == *identity.provider));
            if trusted {
                ids.push(id);
            }
        }
        if self.assignments.is_empty() {
            return ids;
        }
        let by_group = identity
            .roles
            .iter()
            .filter_map(|group| self.by_group.get(&**group));
        let by_subject = self.by_subject.get(&*identity.subject);
        for &index in by_subject.into_iter().chain(by_group).flatten() {
            let assignment = &self.assignments[index];
            let applies = assignment.providers.is_empty()
                || assignment
                    .providers
                    .iter()
                    .any(|p| **p == *identity.provider);
            if applies {
                ids.extend_from_slice(&assignment.roles);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Every role `role` has: itself and what it includes, transitively.
fn closure(role: u32, includes: &[Vec<u32>]) -> Vec<u32> {
    let mut seen = vec![role];
    let mut stack = vec![role];
    while let Some(next) = stack.pop() {
        for &included in &includes[next as usize] {
            if !seen.contains(&included) {
                seen.push(included);
                stack.push(included);
            }
        }
    }
    seen
}

/// A cycle in the inclusion graph, as the roles along it with the first repeated at the end.
fn find_cycle(includes: &[Vec<u32>]) -> Option<Vec<u32>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks = vec![Mark::New; includes.len()];
    for start in 0..includes.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // iterative depth-first search: (role, next edge to follow)
        let mut path: Vec<(u32, usize)> = vec![(start as u32, 0)];
        marks[start] = Mark::OnPath;
        while let Some(&mut (role, ref mut edge)) = path.last_mut() {
            match includes[role as usize].get(*edge) {
                Some(&next) => {
                    *edge += 1;
                    match marks[next as usize] {
                        Mark::New => {
                            marks[next as usize] = Mark::OnPath;
                            path.push((next, 0));
                        }
                        Mark::OnPath => {
                            let from = path.iter().position(|(r, _)| *r == next).unwrap_or(0);
                            let mut cycle: Vec<u32> =
                                path[from..].iter().map(|(r, _)| *r).collect();
                            cycle.push(next);
                            return Some(cycle);
                        }
                        Mark::Done => {}
                    }
                }
                None => {
                    marks[role as usize] = Mark::Done;
                    path.pop();
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_are_found_and_named_in_order() {
        assert_eq!(find_cycle(&[vec![1], vec![2], vec![]]), None);
        assert_eq!(
            find_cycle(&[vec![1], vec![2], vec![0]]),
            Some(vec![0, 1, 2, 0])
        );
        assert_eq!(find_cycle(&[vec![0]]), Some(vec![0, 0]));
        // a diamond is not a cycle
        assert_eq!(find_cycle(&[vec![1, 2], vec![3], vec![3], vec![]]), None);
    }

    #[test]
    fn closure_follows_inclusion_transitively() {
        let includes = vec![vec![1], vec![2], vec![]];
        let mut all = closure(0, &includes);
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2]);
        assert_eq!(closure(2, &includes), vec![2]);
    }
}
