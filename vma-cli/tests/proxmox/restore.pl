#!/usr/bin/perl
# qmrestore of a VMA archive, re-enacted for the vma-rs test suite: drives `vma extract -r`
# exactly the way Proxmox VE's restore does, so that a `vma` which would break a real
# restore breaks this one. Written from reading qemu-server 9.2.6 (src/PVE/QemuServer.pm),
# pve-storage (src/PVE/Storage.pm, src/PVE/Storage/Plugin.pm; partly in PVEStorage.pm)
# and pve-common (src/PVE/Cmd.pm, re-enacted in PVECmd.pm); no code is copied. Each step
# names the Proxmox function it stands for.
#
# Usage:
#   restore.pl --etc-pve DIR --var-tmp DIR --storage SPEC [--storage SPEC ...]
#              [--storage-override ID] [--bwlimit KIB] ARCHIVE|- VMID
#
#   --etc-pve DIR    stands for /etc/pve: the restored config is written to
#                    DIR/qemu-server/VMID.conf, the firewall config to DIR/firewall/VMID.fw
#   --var-tmp DIR    stands for /var/tmp: vma extracts into DIR/vzdumptmpPID and reads
#                    its map from the FIFO DIR/vzdumptmpPID.fifo
#   --storage ID=dir:PATH
#                    a directory storage (Proxmox's "dir" plugin): volumes are created
#                    with qemu-img in PATH/images/VMID/, sparse, so write-zeros is 0
#   --storage ID=pool:VOL[,VOL...]
#                    a thick block storage (stands for LVM): the volumes the test made
#                    beforehand (files or block devices, not zeroed, as large as or larger
#                    than asked for), handed out in allocation order; write-zeros is 1
#   --storage-override ID
#                    qmrestore's --storage option: every disk goes to this storage
#   --bwlimit KIB    qmrestore's --bwlimit (KiB/s): the restore limit of every storage,
#                    which puts throttling.bps/throttling.group into the map lines
#
# Exit status 0 when the restore succeeded; otherwise it dies with Proxmox's message.
#
# What is left out, because it does not change how `vma` is driven: permission checks,
# cstream (only used for archives that sit on a PVE storage with a read limit; ours are
# plain paths), destroying an existing VM's disks, cloud-init drives, bzip2 (not
# installed), and the final config normalisation (parse_vm_config/write_config): the
# rewritten config lines are written as they are.

use strict;
use warnings;

use File::Path qw(mkpath rmtree);
use FindBin;
use Getopt::Long qw(GetOptions);
use IO::File;
use POSIX ();

use lib $FindBin::Bin;
use PVECmd qw(cmd2string run_command);
use PVEStorage qw(archive_info decompressor_info);

$| = 1; # stdout is the task log; keep it in order with what vma prints

my ($etc_pve, $var_tmp, @storage_specs, $storage_override, $bwlimit);
GetOptions(
    'etc-pve=s' => \$etc_pve,
    'var-tmp=s' => \$var_tmp,
    'storage=s' => \@storage_specs,
    'storage-override=s' => \$storage_override,
    'bwlimit=i' => \$bwlimit,
) or die "usage: restore.pl --etc-pve DIR --var-tmp DIR --storage SPEC... ARCHIVE|- VMID\n";
die "usage: restore.pl --etc-pve DIR --var-tmp DIR --storage SPEC... ARCHIVE|- VMID\n"
    if @ARGV != 2 || !$etc_pve || !$var_tmp;
my ($archive, $vmid) = @ARGV;

# The storage configuration (storage.cfg), as far as the restore reads it.
my $storecfg = {};
for my $spec (@storage_specs) {
    if ($spec =~ m/^([^=]+)=dir:(.+)$/) {
        $storecfg->{$1} = { type => 'dir', path => $2 };
    } elsif ($spec =~ m/^([^=]+)=pool:(.+)$/) {
        $storecfg->{$1} = { type => 'pool', volumes => [split(/,/, $2)], next => 0 };
    } else {
        die "bad --storage '$spec'\n";
    }
}

# pve-storage Storage.pm:storage_config
sub storage_config {
    my ($storeid) = @_;
    my $scfg = $storecfg->{$storeid} or die "storage '$storeid' does not exist\n";
    return $scfg;
}

# pve-storage Storage.pm:resolve_format_hint through the plugins' format lists: a dir
# storage takes raw, qcow2 and vmdk (default raw here), a block storage raw only.
sub resolve_format_hint {
    my ($storeid, $format) = @_;
    my $scfg = storage_config($storeid);
    my @valid = $scfg->{type} eq 'dir' ? qw(raw qcow2 vmdk) : qw(raw);
    return (grep { $_ eq $format } @valid) ? $format : 'raw';
}

# pve-storage Plugin.pm:alloc_image (dir: find_free_diskname, then
# Common.pm:qemu_img_create with preallocation_cmd_opt's default) and LVMPlugin's
# alloc_image (here: the next pre-made volume, which must be large enough).
# Returns the volume ID.
sub vdisk_alloc {
    my ($storeid, $vmid, $fmt, $size_kib) = @_;
    my $scfg = storage_config($storeid);
    if ($scfg->{type} eq 'dir') {
        my $imagedir = "$scfg->{path}/images/$vmid";
        mkpath($imagedir);
        my $n = 0;
        $n++ while -e "$imagedir/vm-$vmid-disk-$n.$fmt";
        my $name = "vm-$vmid-disk-$n.$fmt";
        my $prealloc = $fmt eq 'qcow2' ? 'metadata' : 'off';
        my @cmd = ('/usr/bin/qemu-img', 'create');
        push @cmd, '-o', "preallocation=$prealloc" if $fmt eq 'raw' || $fmt eq 'qcow2';
        push @cmd, '-f', $fmt, "$imagedir/$name", "${size_kib}K";
        run_command(\@cmd);
        $scfg->{paths}->{"$storeid:$vmid/$name"} = "$imagedir/$name";
        return "$storeid:$vmid/$name";
    }
    my $i = $scfg->{next}++;
    my $path = $scfg->{volumes}->[$i]
        // die "lvcreate '$storeid/vm-$vmid-disk-$i' error: no pre-made volume left\n";
    my $have = volume_bytes($path);
    die "lvcreate '$storeid/vm-$vmid-disk-$i' error: $path has $have bytes, need "
        . ($size_kib * 1024) . "\n"
        if $have < $size_kib * 1024;
    $scfg->{paths}->{"$storeid:vm-$vmid-disk-$i"} = $path;
    return "$storeid:vm-$vmid-disk-$i";
}

sub volume_bytes {
    my ($path) = @_;
    open(my $fh, '<', $path) or die "unable to open '$path' - $!\n";
    my $end = sysseek($fh, 0, 2) // die "unable to seek '$path' - $!\n";
    close($fh);
    return $end;
}

# pve-storage Storage.pm:path
sub volume_path {
    my ($volid) = @_;
    my ($storeid) = split(/:/, $volid, 2);
    return storage_config($storeid)->{paths}->{$volid} // die "unknown volume '$volid'\n";
}

# pve-storage Plugin.pm:volume_has_feature 'sparseinit': raw, qcow2 and vmdk files on a
# dir storage read back as zeros; thick LVM does not have the feature.
sub volume_has_sparseinit {
    my ($volid) = @_;
    my ($storeid) = split(/:/, $volid, 2);
    return storage_config($storeid)->{type} eq 'dir';
}

# pve-storage Storage.pm:vdisk_free, for cleaning up after a failed restore.
sub vdisk_free {
    my ($volid) = @_;
    my ($storeid) = split(/:/, $volid, 2);
    unlink(volume_path($volid)) if storage_config($storeid)->{type} eq 'dir';
}

# qemu-server QemuServer.pm:$parse_backup_hints: the #qmdump#map lines vzdump's
# assemble() wrote into the backed-up config name the drive, the device in the archive,
# the storage and the format. (The cloud-init branch is left out.)
sub parse_backup_hints {
    my ($fh, $devinfo, $opts) = @_;
    my $virtdev_hash = {};
    while (defined(my $line = <$fh>)) {
        if ($line =~ m/^\#qmdump\#map:(\S+):(\S+):(\S*):(\S*):$/) {
            my ($virtdev, $devname, $storeid, $format) = ($1, $2, $3, $4);
            die "archive does not contain data for drive '$virtdev'\n"
                if !$devinfo->{$devname};
            if (defined($opts->{storage})) {
                $storeid = $opts->{storage} || 'local';
            } elsif (!$storeid) {
                $storeid = 'local';
            }
            $format = 'raw' if !$format;
            $devinfo->{$devname}->{devname} = $devname;
            $devinfo->{$devname}->{virtdev} = $virtdev;
            $devinfo->{$devname}->{format} = $format;
            $devinfo->{$devname}->{storeid} = $storeid;
            storage_config($storeid); # the storage must exist
            $virtdev_hash->{$virtdev} = $devinfo->{$devname};
        }
    }
    return $virtdev_hash;
}

# qemu-server QemuServer.pm:$restore_allocate_devices: one volume per drive, in the
# order of the drive names, the size rounded up to KiB.
sub restore_allocate_devices {
    my ($virtdev_hash, $vmid) = @_;
    my $map = {};
    for my $virtdev (sort keys %$virtdev_hash) {
        my $d = $virtdev_hash->{$virtdev};
        die "got no size for '$virtdev'\n" if !defined($d->{size});
        my $alloc_size = int(($d->{size} + 1024 - 1) / 1024);
        $d->{format} = resolve_format_hint($d->{storeid}, $d->{format});
        my $volid = vdisk_alloc($d->{storeid}, $vmid, $d->{format}, $alloc_size);
        print STDERR "new volume ID is '$volid'\n";
        $d->{volid} = $volid;
        $map->{$virtdev} = $volid;
    }
    return $map;
}

# qemu-server QemuServer.pm:restore_update_config_line, the parts that apply to these
# archives: vzdump's own lines go, restored drives point at their new volume (the
# volume is the first comma-separated field; print_drive's re-ordering is left out).
sub restore_update_config_line {
    my ($map, $line) = @_;
    return '' if $line =~ m/^\#qmdump\#/;
    return '' if $line =~ m/^\#vzdump\#/;
    return '' if $line =~ m/^lock:/;
    return '' if $line =~ m/^unused\d+:/;
    return '' if $line =~ m/^parent:/;
    if ($line =~ m/^((ide|scsi|virtio|sata|efidisk|tpmstate)\d+):\s*(\S+)\s*$/) {
        my ($virtdev, $value) = ($1, $3);
        if ($map->{$virtdev}) {
            my @opts = grep { !m/^format=/ } split(/,/, $value);
            $opts[0] = $map->{$virtdev};
            return "$virtdev: " . join(',', @opts) . "\n";
        }
    }
    return $line;
}

# qemu-server QemuServer.pm:restore_vma_archive
sub restore_vma_archive {
    my ($archive, $vmid, $opts, $comp) = @_;

    my $readfrom = $archive;
    my $commands = [];
    my $dbg_cmdstring = '';
    my $add_pipe = sub {
        my ($cmd) = @_;
        push @$commands, $cmd;
        $dbg_cmdstring .= ' | ' if length($dbg_cmdstring);
        $dbg_cmdstring .= cmd2string($cmd);
        $readfrom = '-';
    };

    # '-' passes our standard input on to the pipeline; a file is opened by its first
    # command (the decompressor, or vma itself).
    my $input = $archive eq '-' ? '<&STDIN' : undef;

    if ($comp) {
        my $cmd = decompressor_info('vma', $comp)->{decompressor};
        push @$cmd, $readfrom;
        $add_pipe->($cmd);
    }

    my $tmpdir = "$var_tmp/vzdumptmp$$";
    rmtree($tmpdir);

    local $SIG{INT} = local $SIG{TERM} = local $SIG{QUIT} = local $SIG{HUP} =
        sub { warn "got interrupt - ignored\n"; };

    # The map goes through a FIFO, opened for writing right after the fork: that blocks
    # until vma opens it for reading.
    my $mapfifo = "$var_tmp/vzdumptmp$$.fifo";
    POSIX::mkfifo($mapfifo, 0600);
    my $fifofh;
    my $openfifo = sub { open($fifofh, '>', $mapfifo) or die $! };

    $add_pipe->(['vma', 'extract', '-v', '-r', $mapfifo, $readfrom, $tmpdir]);

    my $devinfo = {};
    my $virtdev_hash = {};
    my $new_conf_raw = '';
    my %storage_limits;

    # Runs at the CTIME line: the listing is complete, so the config files must already
    # be in $tmpdir under their final names.
    my $print_devmap = sub {
        my $cfgfn = "$tmpdir/qemu-server.conf";
        my $fh = IO::File->new($cfgfn, "r") || die "unable to read qemu-server.conf - $!\n";

        my $fwcfgfn = "$tmpdir/qemu-server.fw";
        if (-f $fwcfgfn) {
            my $pve_firewall_dir = "$etc_pve/firewall";
            mkdir $pve_firewall_dir;
            file_copy($fwcfgfn, "$pve_firewall_dir/$vmid.fw");
        }

        $virtdev_hash = parse_backup_hints($fh, $devinfo, $opts);

        # pve-storage Storage.pm:get_bandwidth_limit('restore', [$storeid], $bwlimit):
        # for root an explicit --bwlimit wins; no storage here has a limit of its own.
        for my $info (values %$virtdev_hash) {
            my $storeid = $info->{storeid};
            next if defined($storage_limits{$storeid});
            my $limit = $opts->{bwlimit} // 0;
            print STDERR "rate limit for storage $storeid: $limit KiB/s\n" if $limit;
            $storage_limits{$storeid} = $limit * 1024;
        }

        for my $devname (keys %$devinfo) {
            die "found no device mapping information for device '$devname'\n"
                if !$devinfo->{$devname}->{virtdev};
        }

        my $map = restore_allocate_devices($virtdev_hash, $vmid);

        for my $virtdev (sort keys %$virtdev_hash) {
            my $d = $virtdev_hash->{$virtdev};
            my $storeid = $d->{storeid};
            my $volid = $d->{volid};

            my $map_opts = '';
            if (my $limit = $storage_limits{$storeid}) {
                $map_opts .= "throttling.bps=$limit:throttling.group=$storeid:";
            }
            my $write_zeros = volume_has_sparseinit($volid) ? 0 : 1;
            my $path = volume_path($volid);

            print $fifofh "${map_opts}format=$d->{format}:${write_zeros}:$d->{devname}=$path\n";
            print "map '$d->{devname}' to '$path' (write zeros = ${write_zeros})\n";
        }

        $fh->seek(0, 0) || die "seek failed - $!\n";
        while (defined(my $line = <$fh>)) {
            $new_conf_raw .= restore_update_config_line($map, $line);
        }
        $fh->close();
    };

    my $oldtimeout;
    eval {
        my $timeout_message = "got timeout preparing VMA restore\n";
        local $SIG{INT} = local $SIG{TERM} = local $SIG{QUIT} = local $SIG{HUP} =
            local $SIG{PIPE} = sub { die "interrupted by signal\n"; };
        local $SIG{ALRM} = sub { die $timeout_message; };

        # Reading the header might hang on a corrupted archive.
        $oldtimeout = alarm(60);
        $timeout_message = "got timeout reading VMA header - corrupted?\n";

        my $parser = sub {
            my $line = shift;
            print "$line\n";
            if ($line =~ m/^DEV:\sdev_id=(\d+)\ssize:\s(\d+)\sdevname:\s(\S+)$/) {
                my ($dev_id, $size, $devname) = ($1, $2, $3);
                $devinfo->{$devname} = { size => $size, dev_id => $dev_id };
            } elsif ($line =~ m/^CTIME: /) {
                $timeout_message = "got timeout during VMA restore\n";
                alarm($oldtimeout || 0);
                $oldtimeout = undef;
                $print_devmap->();
                print $fifofh "done\n";
                close($fifofh);
                $fifofh = undef;
            }
        };

        print "restore vma archive: $dbg_cmdstring\n";
        run_command($commands, input => $input, outfunc => $parser, afterfork => $openfifo);
    };
    my $err = $@;

    alarm($oldtimeout) if $oldtimeout;

    close($fifofh) if $fifofh;
    unlink $mapfifo;
    rmtree $tmpdir;

    if ($err) {
        # $restore_destroy_volumes
        for my $dev (values %$virtdev_hash) {
            my $volid = $dev->{volid} or next;
            eval {
                vdisk_free($volid);
                print STDERR "temporary volume '$volid' successfully removed\n";
            };
            print STDERR "unable to cleanup '$volid' - $@" if $@;
        }
        die $err;
    }

    # restore_merge_config + PVE::QemuConfig->write_config (without re-formatting).
    mkpath("$etc_pve/qemu-server");
    file_set_contents("$etc_pve/qemu-server/$vmid.conf", $new_conf_raw);
}

# qemu-server QemuServer.pm:restore_file_archive: '-' is restored as an uncompressed
# VMA stream; a file's format and compression come from its name.
sub restore_file_archive {
    my ($archive, $vmid, $opts) = @_;
    return restore_vma_archive($archive, $vmid, $opts) if $archive eq '-';
    my $info = archive_info($archive);
    die "tar archives are not re-enacted\n" if $info->{format} eq 'tar';
    return restore_vma_archive($archive, $vmid, $opts, $info->{compression});
}

# pve-common File.pm:file_copy / file_set_contents, simplified (no atomic rename).
sub file_copy {
    my ($src, $dst) = @_;
    open(my $in, '<', $src) or die "unable to open file '$src' - $!\n";
    local $/;
    my $data = <$in> // '';
    close($in);
    file_set_contents($dst, $data);
}

sub file_set_contents {
    my ($path, $data) = @_;
    open(my $out, '>', $path) or die "unable to open file '$path' - $!\n";
    print $out $data or die "write to '$path' failed\n";
    close($out) or die "close '$path' failed - $!\n";
}

restore_file_archive($archive, $vmid, { storage => $storage_override, bwlimit => $bwlimit });
