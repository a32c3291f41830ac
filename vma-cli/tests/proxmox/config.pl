#!/usr/bin/perl
# Reading the VM config out of a VMA backup, re-enacted for the vma-rs test suite:
# pve-storage src/PVE/Storage.pm:extract_vzdump_config_vma (what the GUI's "Show
# Configuration" and every restore's early permission check run), written from reading
# that code; no code is copied.
#
# Usage: config.pl ARCHIVE
#   Prints the config exactly as Proxmox collects it (each line vma printed, plus "\n")
#   and exits 0, or dies with Proxmox's message. ARCHIVE must carry vzdump's name: the
#   compression is read off it.
#
# A compressed archive runs as `DECOMPRESSOR ARCHIVE | vma config -` (bash, pipefail).
# vma may stop reading after the header, so the decompressor may die of SIGPIPE (the
# pipeline then exits 141) or complain of a broken pipe: both are tolerated. Any other
# non-blank line on stderr fails the extraction, even with exit status 0.

use strict;
use warnings;

use FindBin;
use lib $FindBin::Bin;
use PVECmd qw(run_command);
use PVEStorage qw(archive_info);

die "usage: config.pl ARCHIVE\n" if @ARGV != 1;
my ($archive) = @ARGV;

# pve-storage Storage.pm:extract_vzdump_config_vma
sub extract_vzdump_config_vma {
    my ($archive, $comp) = @_;

    my $raw = '';
    my $out = sub { $raw .= "$_[0]\n"; };

    my $info = archive_info($archive);
    $comp //= $info->{compression};
    my $decompressor = $info->{decompressor};

    if ($comp) {
        my $cmd = [[@$decompressor, $archive], ['vma', 'config', '-']];

        my $broken_pipe;
        my $errstring;
        my $err = sub {
            my $output = shift;
            if ($output =~ m/lzop: Broken pipe: <stdout>/
                || $output =~ m/gzip: stdout: Broken pipe/
                || $output =~ m/zstd: error 70 : Write error.*Broken pipe/)
            {
                $broken_pipe = 1;
            } elsif (!defined($errstring) && $output !~ m/^\s*$/) {
                $errstring = "Failed to extract config from VMA archive: $output\n";
            }
        };

        my $rc = eval { run_command($cmd, outfunc => $out, errfunc => $err, noerr => 1) };
        my $rerr = $@;

        $broken_pipe ||= $rc == 141;
        # Not Proxmox's: says on stderr which way the pipeline ended, for the test log.
        print STDERR "[re-enactment] pipeline exit code $rc, broken pipe "
            . ($broken_pipe ? "yes" : "no") . "\n";

        if (!$errstring && !$broken_pipe && $rc != 0) {
            die "$rerr\n" if $rerr;
            die "config extraction failed with exit code $rc\n";
        }
        die "$errstring\n" if $errstring;
    } else {
        run_command(['vma', 'config', $archive], outfunc => $out);
    }

    return $raw;
}

print extract_vzdump_config_vma($archive);
