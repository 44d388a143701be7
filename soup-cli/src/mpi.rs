//! Runs over several processes (cargo feature `mpi`): `mpirun -np W soup mix ...`. The
//! [`Collective`] of soup-core over MPI's all-reduce (rsmpi on the system's OpenMPI). The
//! process joins MPI only when a launcher started it (mpirun sets `OMPI_COMM_WORLD_SIZE`,
//! `PMI_SIZE` or `PMIX_RANK`); a plain `soup` stays a single process.

use candle_core::{DType, Tensor};
use mpi::collective::SystemOperation;
use mpi::traits::{Communicator, CommunicatorCollectives};
use soup_core::Collective;

pub struct Mpi {
    world: mpi::topology::SimpleCommunicator,
    /// Finalises MPI when dropped, after `world`.
    _universe: mpi::environment::Universe,
}

impl Mpi {
    /// MPI's world when this process was started by an MPI launcher.
    pub fn from_env() -> Option<Self> {
        let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        if !launched {
            return None;
        }
        let universe = mpi::initialize()?;
        let world = universe.world();
        Some(Self {
            world,
            _universe: universe,
        })
    }

    /// Ends every process of the run with `code` (MPI_Abort): a failing rank must not leave the
    /// others waiting in a collective.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&self, t: &Tensor) -> soup_core::Result<Tensor> {
        match t.dtype() {
            DType::F32 => self.sum::<f32>(t),
            DType::F64 => self.sum::<f64>(t),
            other => Err(soup_core::SoupError::config(
                "dtype",
                format!("{other:?}"),
                "MPI sums f32 and f64 tensors only",
            )),
        }
    }
}

impl Mpi {
    /// The element-wise sum over all ranks of `t`, whose elements are `T`.
    fn sum<T>(&self, t: &Tensor) -> soup_core::Result<Tensor>
    where
        T: candle_core::WithDType + mpi::datatype::Equivalence + Default,
    {
        let send = t.flatten_all()?.to_vec1::<T>()?;
        let mut recv = vec![T::default(); send.len()];
        self.world
            .all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        Ok(Tensor::from_vec(recv, t.shape(), t.device())?)
    }
}
