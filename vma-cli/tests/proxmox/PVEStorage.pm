package PVEStorage;

# How Proxmox VE tells a backup archive's format and compression and how it
# decompresses one: pve-storage src/PVE/Storage.pm:archive_info (with $BACKUP_EXT_RE_2
# and src/PVE/Storage/Plugin.pm:COMPRESSOR_RE) and Storage.pm:decompressor_info,
# re-enacted for the vma-rs test suite (no code copied).

use strict;
use warnings;

use File::Basename qw(basename);

use base 'Exporter';
our @EXPORT_OK = qw(archive_info decompressor_info);

# The compression is read off the file name, which must be vzdump's:
# vzdump-(lxc|openvz|qemu)-....(tgz|tar|vma)[.(gz|lzo|zst|bz2)].
sub archive_info {
    my ($path) = @_;
    my $volid = basename($path);
    if ($volid =~ m/^(vzdump-(lxc|openvz|qemu)-.+\.(tgz|(?:tar|vma)(?:\.(gz|lzo|zst|bz2))?))$/) {
        my ($type, $extension, $comp) = ($2, $3, $4);
        (my $format = $extension) =~ s/\..*//;
        my $info = decompressor_info($format, $comp);
        $info->{type} = $type;
        return $info;
    }
    die "ERROR: couldn't determine archive info from '$path'\n";
}

# The decompressor command for a format and compression, as an array to which the
# caller appends the archive (or '-'). Only the vma row is needed here.
sub decompressor_info {
    my ($format, $comp) = @_;
    ($format, $comp) = ('tar', 'gz') if $format eq 'tgz' && !defined($comp);
    my $decompressor = {
        vma => {
            gz => ['zcat'],
            lzo => ['lzop', '-d', '-c'],
            zst => ['zstd', '-q', '-d', '-c'],
            bz2 => ['bzcat', '-q'],
        },
    };
    die "ERROR: archive format not defined\n" if !defined($decompressor->{$format});
    my $decomp = $comp ? [@{ $decompressor->{$format}->{$comp} }] : undef;
    return { format => $format, compression => $comp, decompressor => $decomp };
}

1;
