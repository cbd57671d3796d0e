//! Task-based calls (snapshots, reconfiguration): start the task, then poll its `info` until
//! it ends, with a growing pause and an upper bound.

use std::time::Duration;

use roxmltree::Node;

use crate::collector::objects_spec;
use crate::soap::{self, child, child_text, elem};
use crate::{Client, MoRef, VsphereError};

/// Snapshot removal with consolidation of a big disk can take long on real storage.
const TASK_TIMEOUT: Duration = Duration::from_secs(3 * 3600);

impl Client {
    /// CreateSnapshot_Task (memory=false) and wait for it; returns the snapshot.
    pub async fn create_snapshot(
        &self,
        vm: &MoRef,
        name: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<MoRef, VsphereError> {
        let method = "CreateSnapshot_Task";
        let body = format!(
            "{}{}<memory>false</memory><quiesce>{quiesce}</quiesce>",
            elem("name", name),
            elem("description", description)
        );
        let task = self.start_task(method, vm, &body).await?;
        let what = format!("{method} {name:?} of {vm}");
        self.wait_task(&task, &what)
            .await?
            .ok_or_else(|| VsphereError::Protocol {
                method: method.to_string(),
                detail: format!("task {} succeeded without a snapshot reference", task.value),
            })
    }

    /// RemoveSnapshot_Task (removeChildren=false, consolidate=true) and wait for it.
    pub async fn remove_snapshot(&self, snapshot: &MoRef) -> Result<(), VsphereError> {
        let method = "RemoveSnapshot_Task";
        let body = "<removeChildren>false</removeChildren><consolidate>true</consolidate>";
        let task = self.start_task(method, snapshot, body).await?;
        self.wait_task(&task, &format!("{method} of {snapshot}"))
            .await
            .map(|_| ())
    }

    /// ReconfigVM_Task with changeTrackingEnabled=true, and wait.
    pub async fn enable_change_tracking(&self, vm: &MoRef) -> Result<(), VsphereError> {
        let method = "ReconfigVM_Task";
        let body = "<spec><changeTrackingEnabled>true</changeTrackingEnabled></spec>";
        let task = self.start_task(method, vm, body).await?;
        self.wait_task(&task, &format!("{method} (enable change tracking) of {vm}"))
            .await
            .map(|_| ())
    }

    async fn start_task(
        &self,
        method: &str,
        this: &MoRef,
        body: &str,
    ) -> Result<MoRef, VsphereError> {
        self.session()
            .invoke(method, this, body, |response| {
                child(response, "returnval")
                    .and_then(soap::moref)
                    .ok_or_else(|| VsphereError::Protocol {
                        method: method.to_string(),
                        detail: "no task reference in the response".to_string(),
                    })
            })
            .await
    }

    /// Polls the task's `info` with a growing pause until it ends; returns its result when that
    /// is a reference (CreateSnapshot_Task's snapshot).
    async fn wait_task(&self, task: &MoRef, what: &str) -> Result<Option<MoRef>, VsphereError> {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let states = self
                .retrieve(&objects_spec("Task", &[task], &["info"]), |_, props| {
                    Ok(props
                        .get("info")
                        .map(task_state)
                        .unwrap_or(TaskState::Running))
                })
                .await?;
            match states.into_iter().next().unwrap_or(TaskState::Running) {
                TaskState::Success(result) => return Ok(result),
                TaskState::Error { fault, message } => {
                    return Err(VsphereError::Task {
                        what: what.to_string(),
                        fault,
                        message,
                    });
                }
                TaskState::Running => {}
            }
            if started.elapsed() >= TASK_TIMEOUT {
                return Err(VsphereError::TaskTimeout {
                    what: what.to_string(),
                    task: task.value.clone(),
                    waited_secs: started.elapsed().as_secs(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

/// Where a task is.
#[derive(Debug, PartialEq, Eq)]
enum TaskState {
    Running,
    Success(Option<MoRef>),
    Error { fault: String, message: String },
}

/// A `TaskInfo` value.
fn task_state(info: Node<'_, '_>) -> TaskState {
    match child_text(info, "state").as_deref().map(str::trim) {
        Some("success") => TaskState::Success(child(info, "result").and_then(soap::moref)),
        Some("error") => {
            let (fault, message) = child(info, "error")
                .map(soap::localized_fault)
                .unwrap_or_else(|| ("UnknownFault".to_string(), String::new()));
            TaskState::Error { fault, message }
        }
        _ => TaskState::Running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task_info(xml: &str) -> TaskState {
        let doc = roxmltree::Document::parse(xml).expect("xml");
        task_state(doc.root_element())
    }

    #[test]
    fn task_states() {
        let ns = r#"xmlns="urn:vim25" xmlns:x="http://www.w3.org/2001/XMLSchema-instance""#;
        assert_eq!(
            task_info(&format!(
                "<info {ns}><key>task-1</key><state>running</state><progress>40</progress></info>"
            )),
            TaskState::Running
        );
        assert_eq!(
            task_info(&format!(
                r#"<info {ns}><state>success</state><result x:type="ManagedObjectReference" type="VirtualMachineSnapshot">snapshot-9</result></info>"#
            )),
            TaskState::Success(Some(MoRef::new("VirtualMachineSnapshot", "snapshot-9")))
        );
        assert_eq!(
            task_info(&format!("<info {ns}><state>success</state></info>")),
            TaskState::Success(None)
        );
        assert_eq!(
            task_info(&format!(r#"<info {ns}><state>error</state><error><fault x:type="InvalidPowerState"><requestedState>poweredOn</requestedState></fault><localizedMessage>The attempted operation cannot be performed in the current state (Powered off).</localizedMessage></error></info>"#)),
            TaskState::Error {
                fault: "InvalidPowerState".into(),
                message: "The attempted operation cannot be performed in the current state (Powered off).".into()
            }
        );
    }
}
