//! `forward demo` (filled in once the edge crate lands).
use anyhow::Result;

pub async fn run(_args: crate::cli::DemoArgs) -> Result<i32> {
    anyhow::bail!("demo not built yet")
}
