//! OpenAPI schemas of the core's validated types (feature `openapi`), for the daemon's API
//! document (`vfmap-api`, `docs/openapi.json`).
//!
//! Each schema says exactly what the type's constructor or parser accepts: a value the schema
//! allows is accepted, and one it refuses is refused (`scripts/schema-fuzz` holds the daemon to
//! that, both ways). Where the parser is more lenient than what the type prints (PCI IDs, guest
//! paths, which only appear in answers), the schema is the printed form. No I/O here either.

use std::borrow::Cow;

use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use crate::addr::{Bdf, PciId};
use crate::index::{GlobalIndex, LocalIndex};
use crate::pool::{SlotId, VmName};
use crate::profile::{DriverName, FunctionName};
use crate::protocol::GuestPath;

/// A string with a pattern (and optionally a byte bound the pattern does not say).
fn string(pattern: &str, max_length: Option<usize>, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .pattern(Some(pattern))
        .max_length(max_length)
        .into()
}

/// An integer in `minimum..=maximum`.
fn integer(minimum: i64, maximum: Option<i64>, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .description(Some(description))
        .minimum(Some(minimum))
        .maximum(maximum)
        .into()
}

/// `PartialSchema` from a function and `ToSchema` named after the type.
macro_rules! schema {
    ($name:ident, $schema:expr) => {
        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                $schema
            }
        }

        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

schema!(
    VmName,
    string(
        "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        None,
        "A VM's name: letters, digits, `.`, `_`, `-`, starting with a letter or digit, at most \
         64 characters"
    )
);

schema!(
    SlotId,
    string(
        "^[A-Za-z][A-Za-z0-9._-]{0,63}$",
        None,
        "A hot-plug slot's id (QEMU's id rule): a letter, then letters, digits, `.`, `_`, `-`, \
         at most 64 characters"
    )
);

schema!(
    FunctionName,
    string(
        "^[a-z0-9][a-z0-9._-]{0,63}$",
        None,
        "A function's name: lowercase letters, digits, `.`, `_`, `-`, starting with a letter or \
         digit, at most 64 characters"
    )
);

schema!(
    DriverName,
    string(
        "^[A-Za-z0-9_][A-Za-z0-9_-]{0,54}$",
        None,
        "A kernel driver (module) name: letters, digits, `_`, `-`, not starting with `-`, at \
         most 55 characters"
    )
);

schema!(
    Bdf,
    string(
        "^[0-9A-Fa-f]{1,8}:[0-9A-Fa-f]{1,2}:(0?[0-9A-Fa-f]|1[0-9A-Fa-f])\\.[0-7]$",
        None,
        "A PCI location, domain:bus:device.function (hex; device at most 1f, function at most \
         7); answers print it as `0000:3b:00.1`"
    )
);

schema!(
    PciId,
    string(
        "^0x[0-9a-f]{4}$",
        None,
        "A 16-bit PCI vendor or device ID, e.g. `0x1b36`"
    )
);

schema!(
    GuestPath,
    string(
        "^[01][0-9a-f]\\.[0-7]/[01][0-9a-f]\\.[0-7]$",
        None,
        "Where a device sits in the guest: the root port's device.function on bus 0, then the \
         device.function behind it (hex), e.g. `03.0/00.0`"
    )
);

schema!(
    LocalIndex,
    integer(
        0,
        Some(255),
        "A VF's index in its VM: the position of its slot in the VM's slot list (a VM has at \
         most 256 slots)"
    )
);

schema!(
    GlobalIndex,
    integer(
        0,
        Some(i64::from(u32::MAX)),
        "A VF's stable index on the host (the key of the inventory's tables)"
    )
);

/// The schema of a unix socket path (`VmSpec`'s `qmp_socket` and `agent_socket`): a schema
/// only, the values are `String`s that [`crate::Pool::plan_add_vm`] checks.
pub enum SocketPath {}

schema!(
    SocketPath,
    string(
        "^/[^\\x00]*$",
        Some(107),
        "An absolute path of a unix socket: starts with `/`, no NUL, at most 107 bytes (the \
         kernel's limit; a non-ASCII character counts as its UTF-8 bytes)"
    )
);

/// The schema of a libvirt domain name (`VmBackend::Libvirt`'s `domain`): a schema only, the
/// values are `String`s that [`crate::check_domain_name`] checks.
pub enum DomainName {}

schema!(
    DomainName,
    string(
        "^[!-,.0-~][!-.0-~]{0,199}$",
        None,
        "A libvirt domain name: printable ASCII without spaces or `/`, not starting with `-`, \
         at most 200 characters"
    )
);

/// The schema of a libvirt connection URI: a schema only, the values are `String`s that
/// [`crate::check_libvirt_uri`] checks.
pub enum LibvirtUri {}

schema!(
    LibvirtUri,
    string(
        "^[A-Za-z0-9_-]+(\\+unix)?:///[!-~]*$",
        Some(256),
        "A local libvirt connection URI such as `qemu:///system`: `driver[+unix]:///path`, \
         printable ASCII, at most 256 bytes"
    )
);

/// The schema of a virtio-serial port name (the agent's channel): a schema only, the values
/// are `String`s that [`crate::check_port_name`] checks.
pub enum PortName {}

schema!(
    PortName,
    string(
        "^[A-Za-z0-9._-]{1,100}$",
        None,
        "A virtio-serial port name such as `org.vfmap.0`: letters, digits, `.`, `_`, `-`, at \
         most 100 characters"
    )
);

/// The schema of a NUMA node (`numa_node` fields, `i32` values): a schema only.
pub enum NumaNode {}

schema!(
    NumaNode,
    integer(
        i64::from(i32::MIN),
        Some(i64::from(i32::MAX)),
        "A NUMA node, as the kernel numbers them"
    )
);

/// `VmSpec::slots`: 1-256 distinct slot ids, as [`crate::Pool::plan_add_vm`] requires.
pub fn slots_schema() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(SlotId::schema_ref())
        .min_items(Some(1))
        .max_items(Some(256))
        .unique_items(true)
        .description(Some(
            "Ids of the VM's empty hot-plug slots (pcie-root-ports), in order: local index i is \
             slots[i]",
        ))
        .build()
}

/// A libvirt VM's `slots` at registration: 0-256 distinct root port aliases that narrow the
/// domain's free root ports (none: all of them).
pub fn narrowing_slots_schema() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(SlotId::schema_ref())
        .max_items(Some(256))
        .unique_items(true)
        .description(Some(
            "Root ports (libvirt's controller aliases, pci.N) to use, in order; empty: every \
             free hot-pluggable root port of the domain, by controller index",
        ))
        .build()
}

/// A reference to a named schema (`#/components/schemas/<name>`).
trait SchemaRef: ToSchema {
    fn schema_ref() -> RefOr<Schema> {
        RefOr::Ref(utoipa::openapi::Ref::from_schema_name(Self::name()))
    }
}

impl<T: ToSchema> SchemaRef for T {}
